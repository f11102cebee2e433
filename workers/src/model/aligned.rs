//! Buffers whose values start on a cache line.
//!
//! malloc gives 16-byte alignment, and a block it maps afresh (every one of 128 KiB or more,
//! `tune_allocator` in `src/main.rs`) starts 16 bytes into its page: then every 64-byte load
//! or store of the kernels straddles two cache lines, and every other 32-byte one. Packed
//! weights and a pass's activations live in these instead.

use std::ops::{Deref, DerefMut};

/// `len` values from the first 64-byte boundary of a `Vec` of their own.
pub struct Aligned<T> {
    buffer: Vec<T>,
    /// Where the values start in `buffer`.
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    /// Elements of `T` in a cache line: the most a start may be moved by.
    const SPARE: usize = 64 / std::mem::size_of::<T>();

    /// `len` default values.
    pub fn new(len: usize) -> Aligned<T> {
        Aligned::within(Vec::new(), len)
    }

    /// `len` values in `buffer`'s memory, grown first if it cannot hold them from its first
    /// boundary: what it held there (default values where it grew). The `Vec` is never
    /// shortened, so that values it held once are not written again (a kept buffer used for
    /// passes of alternating sizes was cleared anew at every larger one).
    pub fn within(mut buffer: Vec<T>, len: usize) -> Aligned<T> {
        buffer.reserve(Self::capacity_for(len).saturating_sub(buffer.len()));
        let misaligned = buffer.as_ptr() as usize % 64 / std::mem::size_of::<T>();
        let start = (Self::SPARE - misaligned) % Self::SPARE;
        // Within the capacity: the buffer is not moved, so `start` stays on the boundary.
        if buffer.len() < start + len {
            buffer.resize(start + len, T::default());
        }
        debug_assert_eq!(buffer[start..].as_ptr() as usize % 64, 0);
        Aligned { buffer, start, len }
    }

    /// The capacity a `Vec` needs for `within` to keep it where it is.
    pub fn capacity_for(len: usize) -> usize {
        len + Self::SPARE
    }

    /// The memory, for another `within`.
    pub fn into_vec(self) -> Vec<T> {
        self.buffer
    }
}

impl<T> Default for Aligned<T> {
    fn default() -> Aligned<T> {
        Aligned {
            buffer: Vec::new(),
            start: 0,
            len: 0,
        }
    }
}

impl<T> Deref for Aligned<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buffer[self.start..self.start + self.len]
    }
}

impl<T> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_start_on_a_line_and_keep_their_memory() {
        for len in [0, 1, 17, 100_000] {
            let a = Aligned::<f32>::new(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|&v| v == 0.0));
        }
        // Reused: the same memory when it is large enough, whatever it held kept.
        let mut a = Aligned::<f32>::new(1000);
        a[0] = 7.0;
        a[999] = 5.0;
        let at = a.as_ptr();
        let b = Aligned::within(a.into_vec(), 500);
        assert_eq!((b.as_ptr(), b.len(), b[0]), (at, 500, 7.0));
        // Longer again: the values held before are still there, not cleared.
        let b = Aligned::within(b.into_vec(), 1000);
        assert_eq!((b.as_ptr(), b.len(), b[0], b[999]), (at, 1000, 7.0, 5.0));
        // Grown: on a boundary again.
        let c = Aligned::within(b.into_vec(), 300_000);
        assert_eq!((c.len(), c.as_ptr() as usize % 64), (300_000, 0));
    }
}
