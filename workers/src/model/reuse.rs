//! Buffers a computing thread keeps from one forward pass to the next.
//!
//! The master sets the allocator to map every block of 128 KiB or more afresh and to return
//! it to the kernel when freed (`tune_allocator` in `src/main.rs`: it keeps a long-running
//! worker's memory from creeping up). A pass's activations are such blocks, so each pass
//! paid a page fault and a page clearing per 4 KiB it touched, and the unmapping after:
//! ~6 % of a 32-sentence pass's cycles (perf). Up to `KEEP_BYTES` per thread, the buffers are
//! kept for the next pass instead; a larger pass's are freed after it, so what a worker
//! holds between requests stays bounded.

use std::cell::RefCell;

/// At most this many bytes of buffers kept per computing thread: a pass of ~1,000 tokens of
/// all-MiniLM-L6-v2 (~500 of all-mpnet-base-v2) runs entirely in kept buffers.
pub const KEEP_BYTES: usize = 16 << 20;

thread_local! {
    static KEPT: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `len` values, in the smallest kept buffer that holds them, or a new one. What they are
/// is unspecified (what the buffer held before, zeros where it grew): every caller writes
/// before it reads, and clearing them cost 2 % of a pass (perf).
pub fn buffer(len: usize) -> Vec<f32> {
    let kept = KEPT.with_borrow_mut(|kept| {
        let best = kept
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| kept.swap_remove(i))
    });
    let mut buffer = kept.unwrap_or_default();
    buffer.resize(len, 0.0);
    buffer
}

/// Keeps `buffer` for a later `zeroed` on this thread, if the kept buffers stay within
/// `KEEP_BYTES`; frees it otherwise.
pub fn give_back(buffer: Vec<f32>) {
    KEPT.with_borrow_mut(|kept| {
        let held: usize = kept.iter().map(|b| b.capacity()).sum();
        if (held + buffer.capacity()) * std::mem::size_of::<f32>() <= KEEP_BYTES {
            kept.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let a = buffer(1000);
        assert!(a.len() == 1000 && a.iter().all(|&v| v == 0.0));
        let at = a.as_ptr();
        give_back(a);
        // The same memory again, at the length asked for.
        let b = buffer(500);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(b.len(), 500);
        give_back(b);
        // A buffer beyond the bound is not kept.
        give_back(buffer(KEEP_BYTES / 4 + 1));
        KEPT.with_borrow(|kept| {
            assert!(kept.iter().all(|b| b.capacity() <= KEEP_BYTES / 4));
            let held: usize = kept.iter().map(|b| b.capacity() * 4).sum();
            assert!(held <= KEEP_BYTES);
        });
    }
}
