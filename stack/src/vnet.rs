//! vnet (being written).
