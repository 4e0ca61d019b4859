//! Memory the forwarder asks for where a refusal must not abort the process: a flow's
//! buffers. (The host's system calls are its [`crate::HostIo`]'s, outside this crate.)
//!
//! The only module of this crate with `unsafe` code; each block names its invariants.

#![allow(unsafe_code)]

/// `vec![0; len]` that reports a failed allocation instead of aborting the process (under
/// `vm.overcommit_memory=2` or an `RLIMIT_AS`, a flow's buffers may not be had). Like
/// `vec!`, it asks the allocator for zeroed memory, which large sizes get as fresh pages
/// from `mmap`: nothing is written, so nothing is resident until data flows.
pub fn zeroed_buffer(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `len` u8s
    // (size `len`, alignment 1), which is what a `Vec<u8>` of capacity `len` frees; all
    // `len` bytes are initialised (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}
