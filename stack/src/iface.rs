//! iface (being written).
