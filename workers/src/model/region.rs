//! The packed weights of a whole model in one read-only anonymous mapping, asked for on
//! transparent huge pages (2 MiB).
//!
//! Why: a one-sentence forward pass streams every weight once (42 MB for all-MiniLM-L6-v2,
//! more than the L3), which on 4 KiB pages is ~10,000 pages, each a TLB miss and a page walk.
//! On the 2-core Zen 3 development VM, a C loop summing 42 MB took 0.81-0.85x the time on
//! huge pages (medians of 15, two runs, back to back and 50 ms apart: 2.50-3.25 against
//! 2.94-3.90 ms), and a one-sentence `/embed` 0.87-0.91x (`bench/ab.py`). One mapping rather
//! than one per matrix, because a huge page needs a whole aligned 2 MiB of one mapping and
//! most matrices are smaller.
//!
//! The master fills the region before fork and then makes it read-only: the workers share
//! its pages (huge or not) copy-on-write, and a stray write is a fault, not a silent private
//! copy of the weights. Where the kernel gives no huge pages (`transparent_hugepage` set to
//! `never`, or not built in, where the advice is refused) the region is plain pages: the
//! same values, only the page walks differ.

use memmap2::{Advice, Mmap, MmapMut};
use std::io;
use std::sync::Arc;

const HUGE_PAGE: usize = 2 << 20;

/// Where each matrix starts: a cache line, as `aligned::Aligned` gives heap blocks (a 32-byte
/// load straddling two lines costs the kernels).
const ALIGN: usize = 64;

/// A block of values inside a region: byte offset and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    offset: usize,
    bytes: usize,
}

/// The filled, read-only region.
pub struct Region {
    map: Mmap,
}

impl Region {
    /// The values of `span`, as pushed.
    pub fn slice<T: bytemuck::Pod>(&self, span: Span) -> &[T] {
        bytemuck::cast_slice(&self.map[span.offset..span.offset + span.bytes])
    }
}

/// A region being filled, with room for `capacity` bytes.
pub struct RegionBuilder {
    map: MmapMut,
    /// Offset of the first 2 MiB boundary inside the mapping: the values start there.
    base: usize,
    used: usize,
    capacity: usize,
}

impl RegionBuilder {
    /// Room for `capacity` bytes of values (each block taking up to `ALIGN - 1` more). The
    /// mapping is one huge page longer, so that the values can start on a 2 MiB boundary;
    /// pages never written are never backed.
    pub fn new(capacity: usize) -> io::Result<RegionBuilder> {
        let rounded = capacity.max(1).next_multiple_of(HUGE_PAGE);
        let map = MmapMut::map_anon(rounded + HUGE_PAGE)?;
        let start = map.as_ptr() as usize;
        let base = start.next_multiple_of(HUGE_PAGE) - start;
        // Before any page is touched: huge pages are given at the first fault. A refusal
        // (no transparent huge pages in this kernel) leaves plain pages, the same values;
        // `AnonHugePages` in `/proc/<pid>/smaps_rollup` says what was given.
        let _ = map.advise_range(Advice::HugePage, base, rounded);
        Ok(RegionBuilder {
            map,
            base,
            used: 0,
            capacity,
        })
    }

    /// Copies `values` in, on a cache-line boundary.
    pub fn push<T: bytemuck::Pod>(&mut self, values: &[T]) -> Span {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let offset = self.used.next_multiple_of(ALIGN);
        // The caller sized the region from the same blocks: a bug check, not input handling.
        assert!(
            offset + bytes.len() <= self.capacity,
            "weight region sized too small"
        );
        let at = self.base + offset;
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
        self.used = offset + bytes.len();
        Span {
            offset: at,
            bytes: bytes.len(),
        }
    }

    /// The region, read-only from now on.
    pub fn finish(self) -> io::Result<Arc<Region>> {
        Ok(Arc::new(Region {
            map: self.map.make_read_only()?,
        }))
    }
}

/// Room for blocks of these byte sizes, each on its own cache line.
pub fn capacity_for(blocks: impl IntoIterator<Item = usize>) -> usize {
    blocks.into_iter().map(|b| b + ALIGN).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_as_pushed_and_aligned() {
        let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let b: Vec<half::f16> = (0..333).map(|i| half::f16::from_f32(i as f32)).collect();
        let c: Vec<f32> = vec![-1.0; 3 << 20]; // 12 MiB: across several huge pages
        let mut builder = RegionBuilder::new(capacity_for([
            std::mem::size_of_val(&a[..]),
            std::mem::size_of_val(&b[..]),
            std::mem::size_of_val(&c[..]),
        ]))
        .unwrap();
        let spans = [builder.push(&a), builder.push(&b), builder.push(&c)];
        let region = builder.finish().unwrap();
        assert_eq!(region.slice::<f32>(spans[0]), &a[..]);
        assert_eq!(region.slice::<half::f16>(spans[1]), &b[..]);
        assert_eq!(region.slice::<f32>(spans[2]), &c[..]);
        for span in spans {
            assert_eq!(region.slice::<u8>(span).as_ptr() as usize % ALIGN, 0);
        }
        // The values start on a huge-page boundary, whether or not the kernel gives them.
        assert_eq!(
            region.slice::<u8>(spans[0]).as_ptr() as usize % HUGE_PAGE,
            0
        );
    }

    #[test]
    #[should_panic(expected = "sized too small")]
    fn pushing_past_the_capacity_is_a_bug() {
        let mut builder = RegionBuilder::new(100).unwrap();
        builder.push(&[0u8; 101]);
    }
}
