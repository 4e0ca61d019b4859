//! Link configuration (placeholder: being written).
