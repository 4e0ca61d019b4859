//! TAP device (placeholder: being written).
