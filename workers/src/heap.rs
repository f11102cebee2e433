//! Giving freed heap back to the kernel after a large request. Blocks of 128 KiB or more have
//! their own mappings (`tune_allocator` in the master), but a request of thousands of
//! sentences also makes thousands of small ones (a vector per sentence, token lists), which
//! glibc keeps in its heap once freed: measured, a worker's private memory stayed 2.2 MiB
//! (40 %) above idle after clustering 20,000 sentences; with this, 1.0 MiB. `malloc_trim`
//! returns every free page of the heap, not only its top.

/// `trim` a moment from now, on the I/O runtime: once the request that asks for it has been
/// answered and its body, its parsed form and its response have been freed.
pub fn trim_soon() {
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        trim();
    });
}

/// Return free heap pages to the kernel (glibc; a no-op elsewhere).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory glibc's allocator holds free; it takes the
    // allocator's own locks, so it is safe to call from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
