//! Allocator tuning.

/// Makes glibc serve every allocation of 128 KiB or more with its own `mmap`, for good:
/// per-flow TCP buffers then cost memory only for the pages data has touched, and are
/// returned to the system when the flow ends. (glibc otherwise raises the threshold
/// after the first such buffer is freed, and later buffers come from the heap, where
/// `calloc` touches every page.) A no-op where the call fails.
pub fn lazy_large_allocations() {
    // SAFETY: mallopt only changes a malloc tunable; it is called before any thread
    // exists, and M_MMAP_THRESHOLD takes any value up to HEAP_MAX (32 MiB on 64-bit).
    let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
}
