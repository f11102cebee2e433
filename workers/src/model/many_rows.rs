//! The product kernel for many rows (a batch of sentences: hundreds of tokens), written for
//! AVX2 with FMA, and for AVX-512 (`mod avx512`), in place of gemm's on the packed weights of
//! `linear.rs`.
//!
//! Why not gemm: called panel by panel on weights packed at load, gemm re-packed the
//! activations for every 32 outputs (7.5 % of a 32-sentence pass's cycles, perf), and its
//! results differed in the last bits from the few-rows kernel's, so a sentence's vector
//! moved (by up to 1.6e-7) with the requests that shared its pass.
//!
//! How:
//! - The input rows are packed once per product into strips of `STRIP` rows, their values
//!   interleaved step by step (`Strips`); every panel of weights reads them from there.
//! - A register tile of 6 rows × 16 outputs (6 × 64, two panels, with AVX-512): 12
//!   accumulators (24), two weight vectors (four) and one broadcast input per row and step.
//!   Half a panel of weights (16 outputs × `K_BLOCK` steps; two panels × `k_block` steps
//!   with AVX-512) stays in L1 while every strip passes over it; the strips of a row block
//!   (`block_strips`: as many as L2 holds) stay in L2 while every panel passes over them. Each tile prefetches a
//!   share of the next panel's weights (the AVX2 tiles also the outputs of the next strip;
//!   in the AVX-512 kernel that took 1.01-1.02x the time, side by side).
//! - Each output starts from the bias and adds the products step after step in input order,
//!   one fused multiply-add each: the very operations of the few-rows kernel, in the same
//!   order. So both routes give the same bits, and a row's result does not depend on how
//!   many rows it is computed with (`a_row_does_not_depend_on_its_neighbours`).

use super::aligned::Aligned;
use super::linear::{Isa, PANEL};
use super::reuse;
use std::path::Path;
use std::sync::OnceLock;

/// Rows per strip (per register tile).
pub const STRIP: usize = 6;

/// Steps of the input per block: half a panel of 384 steps is 24 KiB of f32, which stays in
/// L1 (32 KiB) while the strips stream past it (a strip's inputs are read once per half, in
/// order, from L2). One block then covers every product whose input is the hidden size (384
/// for all-MiniLM-L6-v2). Measured end to end, side by side with ORT, three runs of 11-15
/// repeats, against 256 steps: 0.96 / 0.94 / 0.98x the time at 128 sentences, 0.88-0.99x at
/// 32; 512 steps (32 KiB, all of L1) was slower than 384 (497 against 489 ms at 128).
pub const K_BLOCK: usize = 384;

/// Full panels per tile for `isa`'s kernel: the AVX-512 tiles take two adjacent panels (64
/// outputs: four weight vectors a step), so that each broadcast input feeds four multiply-adds
/// rather than two. A C loop of this kernel's steps, its operands in L1, ran at 195 GFLOP/s
/// with two vectors a row and 211-232 with four (two forms of the loop), against a measured
/// peak of 240, on an Intel Xeon with AMX. End to end, side by side with one panel a tile (`bench/ab.py`, 15
/// repeats, two runs): 0.89 / 0.90x the time at 8 sentences, 0.92 / 0.94x at 32, 0.95x at 128
/// (the products alone on weights kept in cache, `many_rows_product_speed`: within the
/// noise). The AVX2 tiles have no registers to spare for it.
pub fn panels_per_tile(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 2,
        Isa::Avx2 => 1,
    }
}

/// Steps per block for `isa`'s kernel, so that a tile's weights are the same 24 KiB: the
/// AVX-512 tiles take two whole panels (64 outputs) at once, so 96 steps.
pub fn k_block(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => K_BLOCK / 4,
        Isa::Avx2 => K_BLOCK,
    }
}

/// Strips per row block, at most. Every block streams all of a product's weights once (from
/// L3, each tile prefetching a share), while its strips stay in L2 as every panel passes over
/// them: 48 strips are 432 KiB at 384 steps, 1.7 MiB at 1,536 (the feed-forward output).
/// Measured on an Intel Xeon with 2 MiB of L2 a core, side by side with 20 strips: one-sentence
/// requests at 32 connections (passes of ~37 strips, now one block instead of two) 1.036x the
/// requests/s (medians of 6 rounds, every round ahead by 1.7-6.0 %; 40 strips: 1.031x), passes
/// of 8-400 short sentences 0.98-1.0x the time; 64 strips took 1.015-1.028x the time of 40 at
/// 100-200 sentences (blocks of 59 and 61).
const BLOCK_STRIPS: usize = 48;

/// Strips per row block, at least: the size the kernel had before blocks followed L2, measured
/// on a Zen 3 with 512 KiB of L2 (40 strips were no faster there, with 256 steps a block).
const MIN_BLOCK_STRIPS: usize = 20;

/// The share of a core's L2, in percent, a block's packed inputs may fill (the rest: the
/// weights passing through, the outputs).
const L2_PERCENT: usize = 85;

/// Strips per row block, at most, for products of `k` steps: as many as fill `L2_PERCENT` of a
/// core's L2, within `MIN_BLOCK_STRIPS..=BLOCK_STRIPS`. With 2 MiB of L2 that is 48 at 384 and
/// 1,536 steps; with 512 KiB, 48 at 384 and 20 at 1,536 (whose 36 KiB strips would not stay).
pub fn block_strips(k: usize) -> usize {
    block_strips_for(l2_bytes(), k)
}

fn block_strips_for(l2: usize, k: usize) -> usize {
    let strip = k.max(1) * STRIP * std::mem::size_of::<f32>();
    (l2 / 100 * L2_PERCENT / strip).clamp(MIN_BLOCK_STRIPS, BLOCK_STRIPS)
}

/// A core's L2 in bytes, read once from Linux's sysfs; 512 KiB (the smallest measured, so the
/// smallest blocks) where it cannot be read. The master reads it at start (it logs it), so
/// the workers inherit the value rather than each reading sysfs in its first pass.
pub fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| {
        read_l2_bytes(Path::new("/sys/devices/system/cpu/cpu0/cache")).unwrap_or(512 << 10)
    })
}

/// The size of the level-2 data or unified cache among `caches`' `index*/{level,type,size}`.
fn read_l2_bytes(caches: &Path) -> Option<usize> {
    let caches = std::fs::read_dir(caches).ok()?;
    caches.flatten().find_map(|entry| {
        let field = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let level = field("level")?;
        let kind = field("type")?;
        if level.trim() != "2" || kind.trim() == "Instruction" {
            return None;
        }
        parse_cache_size(&field("size")?)
    })
}

/// sysfs's cache size ("2048K", "1M", "512" bytes) in bytes.
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

/// Strips per row block for a product of `strips` strips of `k` steps: at most
/// `block_strips(k)`, the blocks as even as can be.
pub fn strips_per_block(strips: usize, k: usize) -> usize {
    even_blocks(strips, block_strips(k))
}

/// `strips` in blocks of at most `cap`, as even as can be. Every block streams all the weights
/// once, prefetched a share per tile; a short last block (with at most 20 strips a block, 23
/// strips were 20 + 3) has few tiles to spread that over and ran slowly. Measured then, one
/// pass per request, side by side (median pass times of 21, short sentences): 0.95-0.97x the
/// time at 138-153 tokens (20 + 3 or 6 strips, as 12 + 11 or 13 + 13), 0.96x at 730 tokens,
/// 0.98-0.99x elsewhere from 96 to 470.
fn even_blocks(strips: usize, cap: usize) -> usize {
    let blocks = strips.div_ceil(cap.max(1)).max(1);
    strips.div_ceil(blocks).max(1)
}

/// The input rows packed for the kernel: strip `s` holds rows `s·STRIP..` and, for each
/// step `i`, `[x[s·STRIP][i], .., x[s·STRIP + 5][i]]`. The last strip is padded with zero
/// rows, whose results are never stored.
pub struct Strips {
    /// `[f32; STRIP]` per step, strip after strip; a buffer kept by the thread (`reuse`).
    values: Aligned<f32>,
    pub rows: usize,
    k: usize,
}

impl Strips {
    pub fn new(x: &[f32], rows: usize, k: usize) -> Strips {
        let count = rows.div_ceil(STRIP);
        let mut values = reuse::buffer(count * k * STRIP);
        let steps: &mut [[f32; STRIP]] = bytemuck::cast_slice_mut(&mut values[..]);
        // Strip by strip, each step written whole from its rows: the writes go in order.
        // Row by row, every step of a strip was written six times, a lane at a time: perf put
        // the packing at 4.1 % of the tiles' cycles on 32 sentences, 2.9 % this way; end to
        // end, side by side, 111.7 against 115.8 ms (8 and 128 sentences: within 1 %).
        for (s, strip) in steps.chunks_exact_mut(k).enumerate() {
            let x = &x[s * STRIP * k..rows * k];
            if x.len() >= STRIP * k {
                let r: [&[f32]; STRIP] = std::array::from_fn(|j| &x[j * k..][..strip.len()]);
                for (i, step) in strip.iter_mut().enumerate() {
                    *step = std::array::from_fn(|j| r[j][i]);
                }
            } else {
                // The last strip, not full: the missing rows are zeros rather than what the
                // buffer held (their results are never stored, but an old value could be a
                // slow subnormal).
                for (i, step) in strip.iter_mut().enumerate() {
                    *step = std::array::from_fn(|j| x.get(j * k + i).copied().unwrap_or(0.0));
                }
            }
        }
        Strips { values, rows, k }
    }

    pub fn count(&self) -> usize {
        self.rows.div_ceil(STRIP)
    }

    /// Strip `s`'s inputs at steps `k0..k0 + steps`, and its row count.
    fn strip(&self, s: usize, k0: usize, steps: usize) -> (&[[f32; STRIP]], usize) {
        let all: &[[f32; STRIP]] = bytemuck::cast_slice(&self.values[..]);
        let inputs = &all[s * self.k + k0..s * self.k + k0 + steps];
        (inputs, STRIP.min(self.rows - s * STRIP))
    }
}

impl Drop for Strips {
    fn drop(&mut self) {
        reuse::give_back(std::mem::take(&mut self.values));
    }
}

/// `dst[r][p·PANEL..(p + 1)·PANEL] = start[p] + Σ_i strips[r][k0 + i] · blocks[p][i]` for
/// the rows of strips `first..last` and each of `P` adjacent panels (`P` as
/// `panels_per_tile(isa)`, or 1), `dst` starting at the first panel's first output in row 0
/// (rows `dst_stride` apart). `start` is the biases for the first block of steps (`dst` is then
/// only written), `None` to go on from `dst`'s values. `next[p]` is the weights the following
/// call will read in place of `blocks[p]` (as many bytes, or fewer): the tiles prefetch them
/// between them, so that they come from cache. With `isa`'s instructions, which the caller
/// checked the CPU has.
#[allow(clippy::too_many_arguments)]
pub fn block_product<const P: usize>(
    isa: Isa,
    strips: &Strips,
    (first, last): (usize, usize),
    k0: usize,
    blocks: [&[[f32; PANEL]]; P],
    start: Option<[&[f32; PANEL]; P]>,
    next: [&[u8]; P],
    dst: &mut [f32],
    dst_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.runs_here() {
        // SAFETY: the function is compiled for AVX-512F, and the CPU has it (checked just
        // above); it is otherwise safe code.
        unsafe {
            avx512::block_product(
                strips,
                (first, last),
                k0,
                blocks,
                start,
                next,
                dst,
                dst_stride,
            )
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        for p in 0..P {
            // SAFETY: the function is compiled for AVX2 and FMA, and the CPU has them
            // (checked just above); it is otherwise safe code.
            unsafe {
                avx2::block_product(
                    strips,
                    (first, last),
                    k0,
                    blocks[p],
                    start.map(|s| s[p]),
                    next[p],
                    &mut dst[p * PANEL..],
                    dst_stride,
                )
            };
        }
        return;
    }
    let _ = (
        strips, first, last, k0, blocks, start, next, dst, dst_stride,
    );
    unreachable!("the many-rows route is chosen only on a CPU with AVX2 and FMA");
}

/// `next` shared out evenly among `tiles` tiles, in whole cache lines: each prefetches its
/// share before its steps. Measured end to end on the AVX2 kernel (32 and 128 sentences): a
/// strip's share at once before its two tiles stalled on the prefetches (4 % of the cycles,
/// perf), and one line every few steps took 1.2x the time of this (the step loop compiled
/// worse). The share's size is worked out once per block: per tile, its two divisions were
/// most of the loop around the tiles.
#[derive(Clone, Copy)]
struct Shares<'a> {
    next: &'a [u8],
    share: usize,
}

impl<'a> Shares<'a> {
    #[inline(always)]
    fn new(next: &'a [u8], tiles: usize) -> Shares<'a> {
        let share = next.len().div_ceil(tiles.max(1)).next_multiple_of(64);
        Shares { next, share }
    }

    /// Tile `tile`'s share.
    #[inline(always)]
    fn of(self, tile: usize) -> &'a [u8] {
        let from = (tile * self.share).min(self.next.len());
        &self.next[from..self.next.len().min(from + self.share)]
    }
}

/// `step` on every step of a block, two per iteration: one step a loop iteration was 23
/// instructions, 3 of them the loop's own. Measured end to end on the AVX2 kernel, side by
/// side: 0.96-0.97x the time at 32 and 128 sentences (four steps: within the noise of two).
/// Inlined into each kernel's tile, so that `step` compiles for its instruction set.
#[inline(always)]
fn in_pairs<W>(block: &[W], inputs: &[[f32; STRIP]], mut step: impl FnMut(&W, &[f32; STRIP])) {
    for (w, x) in block.chunks_exact(2).zip(inputs.chunks_exact(2)) {
        step(&w[0], &x[0]);
        step(&w[1], &x[1]);
    }
    if block.len() % 2 == 1 {
        let last = block.len() - 1;
        step(&block[last], &inputs[last]);
    }
}

/// Whether this CPU runs the kernel (AVX2 and FMA).
pub fn available() -> bool {
    super::kernels::avx2_fma_available()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::linear::prefetch;
    use super::{Shares, Strips, PANEL, STRIP};
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps};

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_product(
        strips: &Strips,
        (first, last): (usize, usize),
        k0: usize,
        block: &[[f32; PANEL]],
        start: Option<&[f32; PANEL]>,
        next: &[u8],
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        // Two tiles per strip (the halves) share the next block.
        let shares = Shares::new(next, 2 * (last - first));
        // The first half of the panel over every strip, then the second: a half's 16 KiB of
        // weights stays in L1 while the strips (from L2) pass over it. Both halves per strip
        // (32 KiB, all of L1) left the weights to come from L2: measured end to end, side by
        // side with ORT, 15 repeats: 35.6 / 129.7 / 549.8 ms at 8 / 32 / 128 sentences, against
        // 34.3 / 123.1 / 503.6 ms in this order.
        for s in first..last {
            // Each tile reads its outputs' values at its start, or at least writes them at
            // its end: fetch the next strip's (both halves) while this one computes (they
            // come from L3 or memory when the outputs are wider than L2).
            if s + 1 < last {
                let next = (s + 1) * STRIP * dst_stride;
                let rows = STRIP.min(strips.rows - (s + 1) * STRIP);
                for r in 0..rows {
                    let bytes = bytemuck::cast_slice(&dst[next + r * dst_stride..]);
                    // The panel's 128 bytes of the row: two cache lines, three if unaligned.
                    for at in [0, 64, 127] {
                        prefetch(bytes, at);
                    }
                }
            }
            let (inputs, rows) = strips.strip(s, k0, block.len());
            let dst = &mut dst[s * STRIP * dst_stride..];
            let share = shares.of(s - first);
            tile_half::<0>(block, inputs, rows, start, share, dst, dst_stride);
        }
        for s in first..last {
            let (inputs, rows) = strips.strip(s, k0, block.len());
            let dst = &mut dst[s * STRIP * dst_stride..];
            let share = shares.of(last - first + s - first);
            tile_half::<1>(block, inputs, rows, start, share, dst, dst_stride);
        }
    }

    /// Half `HALF` of the panel (outputs `16·HALF..16·HALF + 16`) for one strip: 6 rows × 2
    /// vectors = 12 accumulators, two weight vectors and one broadcast of AVX2's 16
    /// registers. The accumulators start from `start` (the bias, for the first block of
    /// steps) or else from `dst`; `next` is prefetched before the steps.
    #[allow(clippy::needless_range_loop)] // rows inside, the order that keeps them in registers
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    fn tile_half<const HALF: usize>(
        block: &[[f32; PANEL]],
        inputs: &[[f32; STRIP]],
        rows: usize,
        start: Option<&[f32; PANEL]>,
        next: &[u8],
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let at = HALF * 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; STRIP];
        for r in 0..rows {
            let mut row = [0f32; 16];
            match start {
                Some(start) => row.copy_from_slice(&start[at..at + 16]),
                None => row.copy_from_slice(&dst[r * dst_stride + at..r * dst_stride + at + 16]),
            }
            acc[r] = bytemuck::cast(row);
        }
        // One line of `next` per `pace` steps.
        for at in (0..next.len()).step_by(64) {
            prefetch(next, at);
        }
        let step = |acc: &mut [[__m256; 2]; STRIP], w: &[f32; PANEL], x: &[f32; STRIP]| {
            let mut lanes = [[0f32; 8]; 2];
            lanes[0].copy_from_slice(&w[at..at + 8]);
            lanes[1].copy_from_slice(&w[at + 8..at + 16]);
            let w: [__m256; 2] = bytemuck::cast(lanes);
            for r in 0..STRIP {
                let a = _mm256_set1_ps(x[r]);
                acc[r][0] = _mm256_fmadd_ps(a, w[0], acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, w[1], acc[r][1]);
            }
        };
        super::in_pairs(block, inputs, |w, x| step(&mut acc, w, x));
        for r in 0..rows {
            let row: [f32; 16] = bytemuck::cast(acc[r]);
            dst[r * dst_stride + at..r * dst_stride + at + 16].copy_from_slice(&row);
        }
    }
}

/// The kernel for AVX-512: tiles of 6 rows × two whole panels (24 accumulators of its 32
/// registers, four weight vectors per step; `panels_per_tile`), the same computation as the
/// AVX2 kernel's on twice the lanes and twice the outputs, over blocks of a quarter as many
/// steps (`k_block`), the same 24 KiB. A lone last panel takes tiles of 6 rows × one panel.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::linear::prefetch;
    use super::{Shares, Strips, PANEL, STRIP};
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_setzero_ps};

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn block_product<const P: usize>(
        strips: &Strips,
        (first, last): (usize, usize),
        k0: usize,
        blocks: [&[[f32; PANEL]]; P],
        start: Option<[&[f32; PANEL]; P]>,
        next: [&[u8]; P],
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let steps = blocks[0].len();
        // Loops rather than `next.map`: the closure did not inline into this function
        // (compiled for other features), 1.2 % of a batched pass's cycles (perf).
        let mut split = [Shares::new(&[], 1); P];
        for p in 0..P {
            split[p] = Shares::new(next[p], last - first);
        }
        for s in first..last {
            let (inputs, rows) = strips.strip(s, k0, steps);
            let dst = &mut dst[s * STRIP * dst_stride..];
            let mut shares = [&[][..]; P];
            for p in 0..P {
                shares[p] = split[p].of(s - first);
            }
            tile(blocks, inputs, rows, start, shares, dst, dst_stride);
        }
    }

    /// One strip against `P` panels' weights: 6 rows × 2`P` vectors of accumulators, starting
    /// from `start` (the biases) or else from `dst`; `next` is prefetched before the steps.
    #[allow(clippy::needless_range_loop)] // rows inside, the order that keeps them in registers
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn tile<const P: usize>(
        blocks: [&[[f32; PANEL]]; P],
        inputs: &[[f32; STRIP]],
        rows: usize,
        start: Option<[&[f32; PANEL]; P]>,
        next: [&[u8]; P],
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let mut acc = [[[_mm512_setzero_ps(); 2]; P]; STRIP];
        for r in 0..rows {
            for p in 0..P {
                let mut row = [0f32; PANEL];
                match start {
                    Some(start) => row = *start[p],
                    None => {
                        let at = r * dst_stride + p * PANEL;
                        row.copy_from_slice(&dst[at..at + PANEL]);
                    }
                }
                acc[r][p] = bytemuck::cast(row);
            }
        }
        for next in next {
            for at in (0..next.len()).step_by(64) {
                prefetch(next, at);
            }
        }
        let step =
            |acc: &mut [[[__m512; 2]; P]; STRIP], w: [&[f32; PANEL]; P], x: &[f32; STRIP]| {
                let w: [[__m512; 2]; P] = w.map(|w| bytemuck::cast(*w));
                for r in 0..STRIP {
                    let a = _mm512_set1_ps(x[r]);
                    for p in 0..P {
                        acc[r][p][0] = _mm512_fmadd_ps(a, w[p][0], acc[r][p][0]);
                        acc[r][p][1] = _mm512_fmadd_ps(a, w[p][1], acc[r][p][1]);
                    }
                }
            };
        match P {
            // One panel: two steps an iteration, as the AVX2 kernel (`in_pairs`).
            1 => super::in_pairs(blocks[0], inputs, |w, x| {
                step(&mut acc, std::array::from_fn(|_| w), x)
            }),
            // Two panels: two steps an iteration (48 multiply-adds), zipped, so that the loop
            // has no bounds checks (`P - 1` and `min(1)` only let the arm compile for P = 1,
            // where it never runs). One step an iteration spent 4 of its 37 instructions on
            // the loop, integer work that competes with the multiply-adds for their ports:
            // measured end to end, side by side, two runs, 0.97-0.98x the time at 8, 32 and
            // 128 sentences. (`in_pairs` taking two blocks for both arms compiled to the same
            // loop instructions, placed elsewhere, and measured 1.01-1.03x the time in three
            // runs: not worth the shared code.)
            _ => {
                let pairs = blocks[0]
                    .chunks_exact(2)
                    .zip(blocks[P - 1].chunks_exact(2))
                    .zip(inputs.chunks_exact(2));
                for ((a, b), x) in pairs {
                    step(
                        &mut acc,
                        std::array::from_fn(|p| [&a[0], &b[0]][p.min(1)]),
                        &x[0],
                    );
                    step(
                        &mut acc,
                        std::array::from_fn(|p| [&a[1], &b[1]][p.min(1)]),
                        &x[1],
                    );
                }
                if let (Some(a), Some(b), Some(x)) = (
                    blocks[0].chunks_exact(2).remainder().first(),
                    blocks[P - 1].chunks_exact(2).remainder().first(),
                    inputs.chunks_exact(2).remainder().first(),
                ) {
                    step(&mut acc, std::array::from_fn(|p| [a, b][p.min(1)]), x);
                }
            }
        }
        for r in 0..rows {
            for p in 0..P {
                let row: [f32; PANEL] = bytemuck::cast(acc[r][p]);
                let at = r * dst_stride + p * PANEL;
                dst[at..at + PANEL].copy_from_slice(&row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_are_even_and_never_over_the_limit() {
        for cap in [MIN_BLOCK_STRIPS, 29, BLOCK_STRIPS] {
            for strips in 1..3000 {
                let per = even_blocks(strips, cap);
                assert!(per <= cap, "{strips} strips: blocks of {per}");
                let blocks = strips.div_ceil(per);
                assert_eq!(
                    blocks,
                    strips.div_ceil(cap),
                    "{strips} strips, {blocks} blocks"
                );
                let last = strips - (blocks - 1) * per;
                assert!(
                    last >= 1 && per - last < blocks,
                    "{strips} strips: blocks of {per}, last {last}"
                );
            }
            assert_eq!(even_blocks(cap, cap), cap);
            assert_eq!(even_blocks(cap + 2, cap), (cap + 2).div_ceil(2));
            assert_eq!(even_blocks(2 * cap + 1, cap), (2 * cap + 1).div_ceil(3));
        }
    }

    #[test]
    fn row_blocks_follow_the_l2() {
        let k = |l2_kib: usize, k: usize| block_strips_for(l2_kib << 10, k);
        assert_eq!((k(2048, 384), k(2048, 1536)), (48, 48));
        assert_eq!((k(1280, 384), k(1280, 1536)), (48, 30));
        assert_eq!((k(512, 384), k(512, 1536)), (48, 20));
        assert_eq!(
            (k(0, 384), k(1 << 30, 768)),
            (MIN_BLOCK_STRIPS, BLOCK_STRIPS)
        );
    }

    /// The L2 found among caches laid out as sysfs lays them out (instruction caches and the
    /// other levels passed over), and none where there is no level-2 data or unified cache.
    #[test]
    fn the_l2_is_found_among_the_caches() {
        let root = std::env::temp_dir().join(format!("forkserve-caches-{}", std::process::id()));
        let cache = |index: usize, level: &str, kind: &str, size: &str| {
            let dir = root.join(format!("index{index}"));
            std::fs::create_dir_all(&dir).unwrap();
            for (name, value) in [("level", level), ("type", kind), ("size", size)] {
                std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
            }
        };
        cache(0, "1", "Data", "48K");
        cache(1, "1", "Instruction", "32K");
        cache(3, "3", "Unified", "491520K");
        cache(4, "2", "Instruction", "64K");
        assert_eq!(read_l2_bytes(&root), None);
        cache(2, "2", "Unified", "2048K");
        assert_eq!(read_l2_bytes(&root), Some(2 << 20));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(read_l2_bytes(&root), None);
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("2048K\n"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("524288"), Some(512 << 10));
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size(""), None);
    }
}
