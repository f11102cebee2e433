//! Buffers a computing thread keeps from one forward pass to the next.
//!
//! The master sets the allocator to map every block of 128 KiB or more afresh and to return
//! it to the kernel when freed (`tune_allocator` in `src/main.rs`: it keeps a long-running
//! worker's memory from creeping up). A pass's activations are such blocks, so each pass
//! paid a page fault and a page clearing per 4 KiB it touched, and the unmapping after
//! (~5 % of a 32-sentence pass's cycles in the kernel's page-fault code, perf). Up to
//! `KEEP_BYTES` per worker, the buffers are kept for the next pass instead; a larger pass's
//! are freed after it, so what a worker holds between requests stays bounded. Measured end
//! to end, side by side: 32 sentences took 0.84x the time, 128 sentences 0.89x.

use super::aligned::Aligned;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most this many bytes of buffers kept by a worker, all its computing threads together:
/// a pass of ~1,500 tokens of all-MiniLM-L6-v2 (~590 of all-mpnet-base-v2) on one thread runs
/// entirely in kept buffers (six hidden-wide values per token, and the feed-forward block's
/// chunk: `fast::FFN_ROWS` rows four times as wide). (Per process, not per thread, so that
/// `threads` does not multiply what an idle worker holds.)
pub const KEEP_BYTES: usize = 16 << 20;

/// Bytes kept by all the threads of this process.
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// One thread's kept buffers; a thread that ends frees them and gives back their count.
struct Kept(Vec<Vec<f32>>);

impl Drop for Kept {
    fn drop(&mut self) {
        let held: usize = self.0.iter().map(bytes).sum();
        KEPT_BYTES.fetch_sub(held, Ordering::Relaxed);
    }
}

thread_local! {
    static KEPT: RefCell<Kept> = const { RefCell::new(Kept(Vec::new())) };
}

fn bytes(buffer: &Vec<f32>) -> usize {
    buffer.capacity() * std::mem::size_of::<f32>()
}

/// `len` values, in the smallest kept buffer that holds them, or a new one, from a cache line
/// (`Aligned`: measured end to end, side by side, 0.97x the time of 8- and 32-sentence passes,
/// 0.98x at 128). What they are is unspecified (what the buffer held before, zeros where it
/// grew): every caller writes before it reads, and clearing them cost ~2 % of a pass (perf).
pub fn buffer(len: usize) -> Aligned<f32> {
    let needed = Aligned::<f32>::capacity_for(len);
    // The smallest that holds `len`; else the largest, grown: a new buffer beside the kept ones
    // would leave them unused while the pass's sizes grow, and once the bound is reached every
    // larger pass would map, fault in and free buffers anew (~0.8 % of a 32-connection pass's
    // cycles in page faults and clearing, perf, when requests of different sizes alternate).
    let kept = KEPT.with_borrow_mut(|Kept(kept)| {
        let fits = kept
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= needed)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let largest = || {
            kept.iter()
                .enumerate()
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        };
        fits.or_else(largest).map(|i| kept.swap_remove(i))
    });
    if let Some(buffer) = &kept {
        KEPT_BYTES.fetch_sub(bytes(buffer), Ordering::Relaxed);
    }
    Aligned::within(kept.unwrap_or_default(), len)
}

/// Keeps `buffer` for a later `buffer` on this thread, if the process's kept buffers stay
/// within `KEEP_BYTES`; frees it otherwise.
pub fn give_back(buffer: Aligned<f32>) {
    let buffer = buffer.into_vec();
    let size = bytes(&buffer);
    let reserved = KEPT_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
        (held + size <= KEEP_BYTES).then_some(held + size)
    });
    if reserved.is_ok() {
        KEPT.with_borrow_mut(|Kept(kept)| kept.push(buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let a = buffer(1000);
        assert!(a.len() == 1000 && a.iter().all(|&v| v == 0.0));
        assert_eq!(a.as_ptr() as usize % 64, 0);
        let at = a.as_ptr();
        give_back(a);
        // The same memory again, at the length asked for.
        let b = buffer(500);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(b.len(), 500);
        give_back(b);
        // A buffer beyond the bound is not kept.
        give_back(buffer(KEEP_BYTES / 4 + 1));
        KEPT.with_borrow(|Kept(kept)| {
            assert!(kept.iter().all(|b| b.capacity() <= KEEP_BYTES / 4));
            let held: usize = kept.iter().map(bytes).sum();
            assert!(held <= KEEP_BYTES);
            // Other tests' threads may keep buffers too: the count covers at least ours.
            assert!(KEPT_BYTES.load(Ordering::Relaxed) >= held);
        });
    }
}
