//! txq (being written).
