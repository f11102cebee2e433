//! The linear layers of the forward pass: weights packed once at load (in the master, before
//! fork, so every worker shares them), and the products `x · Wᵀ + b` over them.
//!
//! Three ways to run a product, chosen by the CPU and the number of rows (`FEW_ROWS`):
//! - **Few rows** (a short request: one sentence is ~10 rows): `few_rows_product`, a register
//!   tile over each panel that streams the weights once, with the next block prefetched while
//!   the current one is computed. Such a product is bound by reading the weights from memory
//!   (they do not fit the cache), and gemm's tiling for large products left it waiting.
//! - **Many rows** (a batch): `many_rows.rs`, 6 × 16 register tiles over row blocks that stay
//!   in L2. Both kernels add the same products in the same order: a row's result does not
//!   depend on the route, nor on the rows it is computed with.
//! - **gemm**, on CPUs without AVX2, FMA and F16C, panel by panel over chunks of rows.
//!
//! Both of forkserve's kernels come for AVX2 and for AVX-512 (`Isa`; the widest the CPU has
//! runs): the same operations in the same order on 8 or 16 lanes, so the same bits.
//!
//! The weights are kept as f32, or as f16 with `model.precision = "f16"`: half the bytes to
//! read per token, widened to f32 in registers (F16C) or a block at a time, so every product
//! still computes in f32. With `model.precision = "bf16"` the inputs and weights are rounded
//! to bf16 and multiplied on AMX's tiles (`amx.rs`), on every route.

use super::aligned::Aligned;
use super::amx;
use super::kernels::{matmul, MatRef};
use super::many_rows::{self, Strips};
use super::region::{Region, RegionBuilder, Span};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::Arc;

/// How the weights of the encoder's linear layers are kept in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// As the checkpoint has them: the vectors are sentence-transformers' own.
    #[default]
    F32,
    /// Rounded to IEEE half precision (to nearest); computed in f32.
    F16,
    /// The linear layers' inputs and weights rounded to bfloat16 and multiplied on AMX tiles,
    /// summed in f32; the rest of the pass in f32. Needs a CPU with AMX-BF16.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// The weights' dtype as text-embeddings-inference's `/info` names it (`model_dtype`).
    pub fn dtype(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::F16 => "float16",
            Precision::Bf16 => "bfloat16",
        }
    }
}

/// Outputs per panel: one 128-byte row per input (two cache lines, read in order); wide enough
/// for gemm's widest micro-kernel (16 columns with AVX2, 32 with AVX-512) to run full.
pub const PANEL: usize = 32;

// `forward`'s threads each take whole panels, and a share of bf16 outputs must start on one of
// `amx::product`'s panels.
const _: () = assert!(PANEL.is_multiple_of(amx::PANEL));

/// Up to this many rows a product runs `few_rows_product`, above it the many-rows kernel
/// (where the CPU has AVX2, FMA and F16C). Both give the same bits, so this only sets the
/// speed. Measured by `packed_product_speed` (weights out of cache): the few-rows kernel took
/// 0.6x and 0.8x the many-rows kernel's time at 32 rows of 384 and 1,536 inputs, 1.1x and
/// 1.0x at 48, 1.1x at 64 and 128; end to end (`bench/ort.py`'s requests, side by side),
/// switching at 40 rows instead of 128 took 0.93x the time for 8 sentences (79 rows) and
/// 0.80x for 12.
///
/// The same limit serves the AVX-512 kernels: on a Zen 5 core `packed_product_speed` put
/// their few-rows kernel ahead up to 64 rows (0.83-0.96x the time at 48 and 64) and within
/// 5 % at 128, but end to end, side by side, switching at 96 rows took 1.11x and 1.17x the time at 8 and 12
/// sentences.
const FEW_ROWS: usize = 40;

/// A weight matrix packed once at load into panels of `PANEL` outputs: panel `p` holds
/// outputs `p·PANEL..` as a row-major `[in, PANEL]` block (the last one narrower), so the
/// matrix is read as one sequential stream, panel after panel.
///
/// Why: read in PyTorch's `[out, in]` layout, gemm repacked every weight on every call (85 %
/// of a one-sentence request's time, measured by perf); read from a row-major `[in, out]`
/// copy, each step jumped a whole row ahead.
pub struct Linear {
    packed: Packed,
    bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

enum Packed {
    F32(Aligned<f32>),
    /// All finite (`Linear::in_precision` checks).
    F16(Aligned<f16>),
    /// bf16 in the tiles' layout (`amx::pack`).
    Bf16(Aligned<u16>),
    /// Moved into the model's shared region (`Linear::use_region`), kept as before.
    InRegion {
        region: Arc<Region>,
        span: Span,
        kind: Precision,
    },
}

/// The packed weights as the kernels read them.
#[derive(Clone, Copy)]
enum Stored<'a> {
    /// Read by forkserve's f32 kernels (f16 widened as they go) or gemm.
    Vectors(Weights<'a>),
    /// Read by AMX's tiles (`amx::product`).
    Tiles(&'a [u16]),
}

/// The packed weights from some point on.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Weights<'a> {
    fn from(self, at: usize) -> Weights<'a> {
        match self {
            Weights::F32(w) => Weights::F32(&w[at..]),
            Weights::F16(w) => Weights::F16(&w[at..]),
        }
    }

    /// Values `at..at + len` as f32: borrowed, or widened into `scratch` (by the `half`
    /// crate, with F16C where the CPU has it).
    fn f32s<'s>(self, at: usize, len: usize, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            Weights::F32(w) => &w[at..at + len],
            Weights::F16(w) => {
                scratch.resize(len, 0.0);
                w[at..at + len].convert_to_f32_slice(scratch);
                scratch
            }
        }
    }

    /// Values `at..at + len` as bytes, cut at the end of the weights.
    fn bytes(self, at: usize, len: usize) -> &'a [u8] {
        let size = match self {
            Weights::F32(_) => 4,
            Weights::F16(_) => 2,
        };
        let bytes = self.bytes_from(at);
        &bytes[..bytes.len().min(len * size)]
    }

    /// The weights from value `at` on (none if `at` is past the end), as bytes.
    fn bytes_from(self, at: usize) -> &'a [u8] {
        match self {
            Weights::F32(w) => bytemuck::cast_slice(w.get(at..).unwrap_or_default()),
            Weights::F16(w) => bytemuck::cast_slice(w.get(at..).unwrap_or_default()),
        }
    }
}

impl Linear {
    /// From PyTorch's `[out, in]` weights and `[out]` bias.
    pub fn from_torch(w: &[f32], bias: Vec<f32>, inputs: usize, outputs: usize) -> Linear {
        debug_assert_eq!(w.len(), inputs * outputs);
        Self::from_torch_parts(&[(w, &bias)], inputs)
    }

    /// Several `[out_i, in]` matrices side by side along the outputs (Q, K and V as one
    /// product), packed in one go.
    pub fn from_torch_parts(parts: &[(&[f32], &[f32])], inputs: usize) -> Linear {
        let bias: Vec<f32> = parts.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let outputs = bias.len();
        // Output j's weights, wherever its part keeps them.
        let row = |j: usize| -> &[f32] {
            let mut j = j;
            for (w, b) in parts {
                if j < b.len() {
                    return &w[j * inputs..(j + 1) * inputs];
                }
                j -= b.len();
            }
            unreachable!("output index within the sum of the parts")
        };
        let mut aligned = Aligned::new(inputs * outputs);
        let packed = &mut aligned[..];
        for first in (0..outputs).step_by(PANEL) {
            let width = PANEL.min(outputs - first);
            let panel = &mut packed[first * inputs..(first + width) * inputs];
            for c in 0..width {
                for (i, &v) in row(first + c).iter().enumerate() {
                    panel[i * width + c] = v;
                }
            }
        }
        Linear {
            packed: Packed::F32(aligned),
            bias,
            inputs,
            outputs,
        }
    }

    /// The same layer with its weights kept in `precision` (the bias stays f32). Refuses a
    /// weight that half precision cannot hold (beyond ±65504), or that bf16 rounds to an
    /// infinity, rather than serve infinities; and bf16 where AMX does not run.
    pub fn in_precision(self, precision: Precision) -> Result<Linear, String> {
        let packed = match (precision, self.stored()) {
            (Precision::Bf16, Stored::Vectors(Weights::F32(w))) => {
                amx::enable()?;
                // Output j's weight for input i, in `from_torch_parts`' panels.
                let weight = |j: usize, i: usize| {
                    let first = j / PANEL * PANEL;
                    let width = PANEL.min(self.outputs - first);
                    w[first * self.inputs + i * width + j - first]
                };
                let tiles = amx::pack(weight, self.inputs, self.outputs).map_err(|v| {
                    format!("a weight of {v} is beyond bfloat16's range (±3.39e38)")
                })?;
                Packed::Bf16(tiles)
            }
            (Precision::F16, Stored::Vectors(Weights::F32(w))) => {
                let mut halves = Aligned::new(w.len());
                for (h, &v) in halves.iter_mut().zip(w) {
                    *h = f16::from_f32(v);
                    if !h.is_finite() {
                        return Err(format!(
                            "a weight of {v} is beyond half precision's range (±65504)"
                        ));
                    }
                }
                Packed::F16(halves)
            }
            // Already so (`from_torch` packs f32).
            _ => return Ok(self),
        };
        Ok(Linear { packed, ..self })
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        match self.stored() {
            Stored::Vectors(Weights::F32(w)) => std::mem::size_of_val(w),
            Stored::Vectors(Weights::F16(w)) => std::mem::size_of_val(w),
            Stored::Tiles(w) => std::mem::size_of_val(w),
        }
    }

    /// Copies the packed weights into `builder`; `use_region` then serves them from there.
    pub fn copy_into(&self, builder: &mut RegionBuilder) -> Span {
        match self.stored() {
            Stored::Vectors(Weights::F32(w)) => builder.push(w),
            Stored::Vectors(Weights::F16(w)) => builder.push(w),
            Stored::Tiles(w) => builder.push(w),
        }
    }

    /// Serve the weights from `span` of `region` (where `copy_into` put them), and free this
    /// layer's own copy.
    pub fn use_region(&mut self, region: &Arc<Region>, span: Span) {
        let kind = match self.stored() {
            Stored::Vectors(Weights::F32(_)) => Precision::F32,
            Stored::Vectors(Weights::F16(_)) => Precision::F16,
            Stored::Tiles(_) => Precision::Bf16,
        };
        self.packed = Packed::InRegion {
            region: region.clone(),
            span,
            kind,
        };
    }

    fn stored(&self) -> Stored<'_> {
        match &self.packed {
            Packed::F32(w) => Stored::Vectors(Weights::F32(w)),
            Packed::F16(w) => Stored::Vectors(Weights::F16(w)),
            Packed::Bf16(w) => Stored::Tiles(w),
            Packed::InRegion { region, span, kind } => match kind {
                Precision::F32 => Stored::Vectors(Weights::F32(region.slice(*span))),
                Precision::F16 => Stored::Vectors(Weights::F16(region.slice(*span))),
                Precision::Bf16 => Stored::Tiles(region.slice(*span)),
            },
        }
    }

    /// The weights for forkserve's f32 kernels and gemm: `forward` sends bf16 weights to
    /// `amx::product` instead, so these never see them.
    fn weights(&self) -> Weights<'_> {
        match self.stored() {
            Stored::Vectors(w) => w,
            Stored::Tiles(_) => unreachable!("bf16 weights run on AMX's tiles (`forward`)"),
        }
    }

    /// The panels from output `from` to `to` (on panel boundaries): (first output, width).
    fn panel_spans(&self, from: usize, to: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (from..to)
            .step_by(PANEL)
            .map(|first| (first, PANEL.min(self.outputs - first)))
    }

    /// `out[rows, outputs] = x[rows, inputs] · Wᵀ + b`.
    ///
    /// With several threads, each takes a contiguous share of the panels (half the weights
    /// to stream each, which is what a short request waits on) into a buffer of its own,
    /// copied into place after: gemm's own threading would split each narrow panel's product.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32], threads: usize) {
        let n = self.outputs;
        let x = &x[..rows * self.inputs];
        let out = &mut out[..rows * n];
        // bf16: the inputs rounded once, whichever threads share the outputs.
        let tiles = match self.stored() {
            Stored::Tiles(packed) => Some((packed, amx::Rows::new(x, rows, self.inputs))),
            Stored::Vectors(_) => None,
        };
        let outputs_into = |from: usize, to: usize, dst: &mut [f32], dst_stride: usize| match &tiles
        {
            Some((packed, rounded)) => {
                amx::product(rounded, packed, &self.bias, n, from, to, dst, dst_stride)
            }
            None => self.panels_into(x, rows, from, to, dst, dst_stride),
        };
        let panels = n.div_ceil(PANEL);
        if threads <= 1 || panels < 2 {
            outputs_into(0, n, out, n);
            return;
        }
        let per_thread = panels.div_ceil(threads.min(panels)) * PANEL;
        let firsts: Vec<usize> = (0..n).step_by(per_thread).collect();
        let shares: Vec<(usize, usize, Vec<f32>)> = firsts
            .into_par_iter()
            .map(|first| {
                let width = per_thread.min(n - first);
                let mut part = vec![0f32; rows * width];
                outputs_into(first, first + width, &mut part, width);
                (first, width, part)
            })
            .collect();
        for (first, width, part) in shares {
            for (r, src) in part.chunks_exact(width).enumerate() {
                out[r * n + first..r * n + first + width].copy_from_slice(src);
            }
        }
    }

    /// Outputs `from..to` (on panel boundaries) into `dst`, whose rows are `dst_stride` apart
    /// and start at output `from`.
    fn panels_into(
        &self,
        x: &[f32],
        rows: usize,
        from: usize,
        to: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let route = match (best_isa(), rows <= FEW_ROWS) {
            (Some(isa), true) => Route::FewRows(isa),
            (Some(isa), false) => Route::ManyRows(isa),
            (None, _) => Route::Gemm {
                chunk: chunk_rows(self.inputs),
            },
        };
        self.panels_by(x, rows, from, to, dst, dst_stride, route);
    }

    /// Outputs `from..to` (on panel boundaries), `x · Wᵀ + b`, by the given route, into `dst`
    /// as `panels_into`.
    #[allow(clippy::too_many_arguments)]
    fn panels_by(
        &self,
        x: &[f32],
        rows: usize,
        from: usize,
        to: usize,
        dst: &mut [f32],
        dst_stride: usize,
        route: Route,
    ) {
        let k = self.inputs;
        let weights = self.weights();
        let mut scratch = Vec::new();
        // The few-rows and gemm kernels add to `dst`: it starts as the bias. The many-rows
        // kernel starts from the bias itself, but for a narrow last panel.
        let bias_from = match route {
            Route::ManyRows(_) => from + (to - from) / PANEL * PANEL,
            _ => from,
        };
        for r in 0..rows {
            let row = &mut dst[r * dst_stride..r * dst_stride + (to - from)];
            row[bias_from - from..].copy_from_slice(&self.bias[bias_from..to]);
        }
        match route {
            Route::FewRows(isa) => {
                let grouped = Grouped::new(x, rows, k, tile_height(weights, rows, isa));
                for (first, width) in self.panel_spans(from, to) {
                    let panel = Panel {
                        weights: weights.from(first * k),
                        k,
                        width,
                    };
                    let dst = &mut dst[first - from..];
                    match width {
                        PANEL => few_rows_product(
                            isa,
                            &grouped,
                            rows,
                            panel,
                            dst,
                            dst_stride,
                            &mut scratch,
                        ),
                        _ => narrow_product(x, rows, panel, dst, dst_stride, &mut scratch),
                    }
                }
            }
            Route::ManyRows(isa) => self.many_rows_panels(isa, x, rows, from, to, dst, dst_stride),
            // Each chunk of rows stays in L2 while every panel passes over it (a panel call
            // over all rows re-read the whole input from memory for each 32 outputs).
            Route::Gemm { chunk } => {
                for r0 in (0..rows).step_by(chunk) {
                    let chunk_rows = chunk.min(rows - r0);
                    let lhs = MatRef::new(&x[r0 * k..], chunk_rows, k, k, 1);
                    let dst = &mut dst[r0 * dst_stride..];
                    for (first, width) in self.panel_spans(from, to) {
                        let panel = weights.f32s(first * k, k * width, &mut scratch);
                        let rhs = MatRef::new(panel, k, width, width, 1);
                        let dst = &mut dst[first - from..];
                        matmul(dst, dst_stride, 1, true, lhs, rhs, 1.0, 1);
                    }
                }
            }
        }
    }

    /// `panels_by` on the many-rows route: for each block of strips, each group of full panels
    /// (`many_rows::panels_per_tile`) and each block of steps, `many_rows::block_product`,
    /// starting from the bias on the first block of steps; a narrow last panel row by row,
    /// after. The blocks of steps inside the groups, rather than around them, so that the
    /// weights are read in the order they are packed (each panel's blocks one after the other)
    /// and a group's outputs are read and written again while they are still in cache:
    /// measured end to end, side by side, 0.96-0.99x the time at 8-128 sentences.
    #[allow(clippy::too_many_arguments)]
    fn many_rows_panels(
        &self,
        isa: Isa,
        x: &[f32],
        rows: usize,
        from: usize,
        to: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let k = self.inputs;
        let weights = self.weights();
        let strips = Strips::new(x, rows, k);
        let k_block = many_rows::k_block(isa);
        let group = many_rows::panels_per_tile(isa);
        // Outputs `from..full_to` are whole panels (only the matrix's last may be narrow).
        let full_panels = self
            .panel_spans(from, to)
            .filter(|&(_, w)| w == PANEL)
            .count();
        let full_to = from + full_panels * PANEL;
        // f16 weights widened a block at a time, into 64-byte aligned memory (in a plain Vec
        // every other 32-byte load of the tiles straddled two cache lines).
        let mut widened = Aligned::<f32>::new(match weights {
            Weights::F32(_) => 0,
            Weights::F16(_) => group * k_block.min(k) * PANEL,
        });
        let per_block = many_rows::strips_per_block(strips.count(), k);
        for s0 in (0..strips.count()).step_by(per_block) {
            let strips_in_block = (s0, strips.count().min(s0 + per_block));
            for a in (from..full_to).step_by(group * PANEL) {
                for k0 in (0..k).step_by(k_block) {
                    let len = k_block.min(k - k0) * PANEL;
                    // What the next call reads: these panels' next block of steps, or the next
                    // group's first (a prefetch hint: nothing past this call's outputs).
                    let next = |first: usize| match (k0 + k_block < k, first + group * PANEL < to) {
                        (true, _) => weights.bytes(
                            first * k + (k0 + k_block) * PANEL,
                            k_block.min(k - k0 - k_block) * PANEL,
                        ),
                        (false, true) => {
                            weights.bytes((first + group * PANEL) * k, k_block.min(k) * PANEL)
                        }
                        (false, false) => &[],
                    };
                    let start = |first: usize| match k0 {
                        0 => self.bias[first..].first_chunk::<PANEL>(),
                        _ => None,
                    };
                    let mut wide = widened.chunks_exact_mut(len.max(1));
                    let mut block = |first: usize| -> &[[f32; PANEL]] {
                        let at = first * k + k0 * PANEL;
                        bytemuck::cast_slice(match weights {
                            Weights::F32(w) => &w[at..at + len],
                            Weights::F16(w) => {
                                // `widened` holds `group` blocks: never short.
                                let wide = wide.next().unwrap_or_default();
                                widen_f16(isa, &w[at..at + len], wide);
                                &*wide
                            }
                        })
                    };
                    let dst = &mut dst[a - from..];
                    // Two panels a tile where the kernel takes two and both are whole; else one.
                    let b = a + PANEL;
                    match group == 2 && b < full_to {
                        false => many_rows::block_product(
                            isa,
                            &strips,
                            strips_in_block,
                            k0,
                            [block(a)],
                            start(a).map(|s| [s]),
                            [next(a)],
                            dst,
                            dst_stride,
                        ),
                        true => many_rows::block_product(
                            isa,
                            &strips,
                            strips_in_block,
                            k0,
                            [block(a), block(b)],
                            start(a).zip(start(b)).map(|(a, b)| [a, b]),
                            [next(a), next(b)],
                            dst,
                            dst_stride,
                        ),
                    }
                }
            }
        }
        if let Some((first, width)) = self.panel_spans(from, to).last() {
            if width != PANEL {
                let panel = Panel {
                    weights: weights.from(first * k),
                    k,
                    width,
                };
                let dst = &mut dst[first - from..];
                narrow_product(x, rows, panel, dst, dst_stride, &mut Vec::new());
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Route {
    FewRows(Isa),
    ManyRows(Isa),
    /// Where the CPU lacks AVX2, FMA or F16C.
    Gemm {
        chunk: usize,
    },
}

/// Input rows per chunk of a gemm product: about 768 KiB of activations (most of a 1 MiB
/// L2), and never fewer than 128 rows. Measured by `chunked_product_speed`: at 3,000 rows
/// chunks run 1.7–1.8× as fast as one call over all rows; up to 512 rows the two are within
/// the noise.
fn chunk_rows(inputs: usize) -> usize {
    (196_608 / inputs.max(1)).max(128)
}

/// The vector instructions forkserve's own product kernels run on. Both kernels compute each
/// output lane by lane in the same order with the same fused multiply-adds on either, so the
/// results are the same bits on both; AVX-512 only does twice the lanes per instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (with AVX2, FMA and F16C): 16 lanes and 32 registers.
    Avx512,
    /// AVX2 with FMA and F16C: 8 lanes and 16 registers.
    Avx2,
}

impl Isa {
    /// As the start-up log names it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }

    /// Whether this CPU runs it (a cached CPUID check: cheap enough for every call).
    pub fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => few_rows_available() && std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 => false,
            Isa::Avx2 => few_rows_available(),
        }
    }
}

/// The kernels this CPU runs, the widest first (none without AVX2, FMA and F16C: gemm runs
/// every product there). The tests hold each to the same bits.
pub fn available_isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|isa| isa.runs_here())
        .collect()
}

/// The L2 cache of a core in bytes, by which the many-rows kernel sizes its blocks of rows
/// (`many_rows::block_strips`): read once. The master logs it at start, so that it is read
/// there, before fork, and no worker reads sysfs during a request.
pub fn l2_cache_bytes() -> usize {
    many_rows::l2_bytes()
}

/// The widest kernel this CPU runs. On a CPU whose 512-bit multiply-adds run at twice the rate
/// of AVX2's (the Zen 5 of the development machine), the AVX2 kernels reach half of what the
/// core can do, and ONNX Runtime's AVX-512 kernels were 1.2x as fast on 8 sentences.
pub fn best_isa() -> Option<Isa> {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .find(|isa| isa.runs_here())
}

/// The few-rows kernel is written for AVX2 with FMA and F16C (x86 CPUs since 2013-2015): elsewhere,
/// gemm runs every product. Public for the tests that hold forkserve's own kernels to the same
/// bits on every route (`tests/batching.rs`).
pub fn few_rows_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows per register tile of the few-rows kernel: three (12 accumulators of AVX2's 16
/// registers, three broadcasts, one weight vector), or two where f16 weights are widened in
/// registers. Widening holds a second weight vector while the first is used, and with three
/// rows the compiler spilled an accumulator to the stack: the store-to-load round trip on it
/// each step cut the speed to a third (`hot_product_speed`).
/// With AVX-512, six rows (12 accumulators of its 32 registers, the multiply-adds in flight
/// that its latency needs), f16 too: there is room to widen in registers.
fn tile_height(weights: Weights, rows: usize, isa: Isa) -> usize {
    match (isa, widened_in_registers(weights, rows)) {
        (Isa::Avx512, _) => 6,
        (Isa::Avx2, true) => 2,
        (Isa::Avx2, false) => 3,
    }
}

/// Whether f16 weights are widened in registers as they are used (no copy of the block), or
/// a block at a time into f32 first. Each group of rows widens them again, so with many
/// groups a block's single widening costs less. Measured by `packed_product_speed`: in
/// registers took 0.55-0.84x the time at 9 rows, 0.56-1.39x at 16 (the noise), and the same
/// within the noise from 32 rows on.
fn widened_in_registers(weights: Weights, rows: usize) -> bool {
    matches!(weights, Weights::F16(_)) && rows <= 16
}

/// The rows in as few groups of at most `height` as hold them, the sizes as even as can be
/// (10 rows in threes: 3, 3, 2, 2, not 3, 3, 3, 1): a lone row keeps only four accumulators
/// busy, and waits on the FMA's latency rather than its throughput (measured end to end, one
/// sentence of ~10 tokens: 0.92x ORT's time against 0.97x with the lone row, 0.84x against
/// 0.94x with f16 weights). Yields (first row, rows).
fn group_spans(rows: usize, height: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = rows.div_ceil(height.max(1));
    let (base, taller) = (rows / groups.max(1), rows % groups.max(1));
    (0..groups).map(move |g| (g * base + g.min(taller), base + usize::from(g < taller)))
}

/// The input rows in groups (`group_spans`) of at most `height`, each group's rows
/// interleaved step by step: a group of `h` rows from row `f` on starts where row `f` does,
/// and holds `[x[f][i], x[f + 1][i], .., x[f + h - 1][i]]` for each step `i`. The kernel then
/// reads one contiguous stream per group, the same for every panel. Built once per product;
/// the kernel takes the height from here, so the layout and its reading cannot disagree.
struct Grouped {
    values: Vec<f32>,
    height: usize,
}

impl Grouped {
    fn new(x: &[f32], rows: usize, k: usize, height: usize) -> Grouped {
        let mut values = vec![0f32; rows * k];
        for (first, h) in group_spans(rows, height) {
            let group = &mut values[first * k..(first + h) * k];
            for (r, row) in x[first * k..(first + h) * k].chunks_exact(k).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    group[i * h + r] = v;
                }
            }
        }
        Grouped { values, height }
    }
}

/// One packed `[k, width]` panel; `weights` runs on past it to the end of the matrix, so that
/// the next panel can be prefetched.
#[derive(Clone, Copy)]
struct Panel<'a> {
    weights: Weights<'a>,
    k: usize,
    width: usize,
}

/// Steps of `k` per block: 128 rows of a panel are 16 KiB in f32, which stay in L1 (32 KiB)
/// while every group of rows passes over them, and the block after is prefetched meanwhile.
const K_BLOCK: usize = 128;

/// `dst[r][0..PANEL] += Σ_i x[r][i] · panel[i][0..PANEL]` for every row `r` of the inputs
/// (in `grouped`'s layout; a full panel), with AVX2, FMA and F16C; the route is only chosen where the CPU has
/// them (`few_rows_available`), and this checks again before entering code compiled for them.
fn few_rows_product(
    isa: Isa,
    grouped: &Grouped,
    rows: usize,
    panel: Panel,
    dst: &mut [f32],
    dst_stride: usize,
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.runs_here() {
        match isa {
            // SAFETY: each function is compiled for its instruction set, which the CPU has
            // (checked just above); they are otherwise safe code.
            Isa::Avx512 => unsafe {
                avx512::few_rows_product(grouped, rows, panel, dst, dst_stride)
            },
            Isa::Avx2 => unsafe {
                avx2::few_rows_product(grouped, rows, panel, dst, dst_stride, scratch)
            },
        }
        return;
    }
    let _ = (grouped, rows, panel, dst, dst_stride, scratch);
    unreachable!("the few-rows route is chosen only on a CPU with its instruction set");
}

/// f16 values widened into `dst` (as long) by `isa`'s conversion, 16 or 8 at a time: the half
/// crate's, a function call per 8 values, took 11 % of a 32-sentence pass with f16 weights
/// on AVX-512 (perf), each block of weights being widened once per block of rows.
fn widen_f16(isa: Isa, src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.runs_here() {
        match isa {
            // SAFETY: each function is compiled for its instruction set, which the CPU has
            // (checked just above); they are otherwise safe code.
            Isa::Avx512 => unsafe { avx512::widen(src, dst) },
            Isa::Avx2 => unsafe { avx2::widen(src, dst) },
        }
        return;
    }
    let _ = isa;
    src.convert_to_f32_slice(dst);
}

/// `src` widened into `dst` (as long), `N` values at a time by `convert`, the rest one by one.
/// Inlined into each instruction set's `widen`, so that `convert` compiles for it.
#[inline(always)]
fn widen_by<const N: usize>(src: &[f16], dst: &mut [f32], convert: impl Fn([f16; N]) -> [f32; N]) {
    let (halves, rest) = src.as_chunks::<N>();
    let (wide, wide_rest) = dst[..src.len()].as_chunks_mut::<N>();
    for (w, h) in wide.iter_mut().zip(halves) {
        *w = convert(*h);
    }
    for (w, h) in wide_rest.iter_mut().zip(rest) {
        *w = h.to_f32();
    }
}

/// The narrow last panel of a matrix (outputs not a multiple of `PANEL`), row by row, for
/// both AVX2 routes: one computation, so both give the same bits. With AVX2, FMA and F16C,
/// like `few_rows_product`.
fn narrow_product(
    x: &[f32],
    rows: usize,
    panel: Panel,
    dst: &mut [f32],
    dst_stride: usize,
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if few_rows_available() {
        // SAFETY: the function is compiled for AVX2, FMA and F16C, and the CPU has them
        // (checked just above); it is otherwise safe code.
        unsafe { avx2::narrow_panel_product(x, rows, panel, dst, dst_stride, scratch) };
        return;
    }
    let _ = (x, rows, panel, dst, dst_stride, scratch);
    unreachable!("the many-rows route is chosen only on a CPU with AVX2, FMA and F16C");
}

/// The few-rows kernel, written with AVX2 intrinsics: left to the auto-vectoriser, the same
/// loops compiled into code whose speed changed 4x with the loop order (measured by
/// `hot_product_speed`), as register allocation spilled accumulators or not.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{
        group_spans, prefetch, prefetch_to_l2, widened_in_registers, Grouped, Panel, Prefetcher,
        Weights, FAR_AHEAD, K_BLOCK, PANEL,
    };
    use bytemuck::cast_slice;
    use half::f16;
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_cvtph_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps,
    };

    /// One `PANEL`-wide row of f32 in four vectors.
    type Row = [__m256; PANEL / 8];

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn few_rows_product(
        grouped: &Grouped,
        rows: usize,
        panel: Panel,
        dst: &mut [f32],
        dst_stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        debug_assert_eq!(panel.width, PANEL, "a narrow panel runs narrow_product");
        let k = panel.k;
        let mut groups = Groups {
            grouped: &grouped.values,
            rows,
            height: grouped.height,
            k,
            dst,
            dst_stride,
        };
        let f32_vector = |w: &[f32; PANEL], j: usize| {
            let mut lanes = [0f32; 8];
            lanes.copy_from_slice(&w[j * 8..j * 8 + 8]);
            bytemuck::cast::<[f32; 8], __m256>(lanes)
        };
        let f16_vector = |w: &[f16; PANEL], j: usize| {
            let mut lanes = [f16::ZERO; 8];
            lanes.copy_from_slice(&w[j * 8..j * 8 + 8]);
            _mm256_cvtph_ps(bytemuck::cast::<[f16; 8], __m128i>(lanes))
        };
        for k0 in (0..k).step_by(K_BLOCK) {
            let steps = K_BLOCK.min(k - k0);
            let (at, len) = (k0 * PANEL, steps * PANEL);
            let next = panel.weights.bytes_from(at + len);
            match panel.weights {
                Weights::F32(w) => groups.run(cast_slice(&w[at..at + len]), k0, next, f32_vector),
                // Halves widened in registers as they are used, or the block once into
                // `scratch` (`widened_in_registers` says which), by the kernel's own F16C
                // conversion: `Weights::f32s` (the half crate's) took 1.1-1.6x the time at 32
                // rows (`packed_product_speed`), the same within the noise from 48 rows on.
                Weights::F16(w) if widened_in_registers(panel.weights, rows) => {
                    groups.run(cast_slice(&w[at..at + len]), k0, next, f16_vector)
                }
                Weights::F16(w) => {
                    let block: &[[f16; PANEL]] = cast_slice(&w[at..at + len]);
                    scratch.resize(len, 0.0);
                    for (wide, half) in scratch.chunks_exact_mut(PANEL).zip(block) {
                        for (j, lanes) in wide.chunks_exact_mut(8).enumerate() {
                            lanes.copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(f16_vector(
                                half, j,
                            )));
                        }
                    }
                    groups.run(cast_slice(scratch), k0, next, f32_vector)
                }
            }
        }
    }

    /// `src` widened into `dst`, 8 values per conversion.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn widen(src: &[f16], dst: &mut [f32]) {
        super::widen_by::<8>(src, dst, |h| {
            bytemuck::cast(_mm256_cvtph_ps(bytemuck::cast::<[f16; 8], __m128i>(h)))
        });
    }

    /// The narrow last panel of a matrix whose outputs are not a multiple of `PANEL`, row by
    /// row (one such panel at most per matrix).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn narrow_panel_product(
        x: &[f32],
        rows: usize,
        panel: Panel,
        dst: &mut [f32],
        dst_stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        let (k, width) = (panel.k, panel.width);
        let w = panel.weights.f32s(0, k * width, scratch);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let out = &mut dst[r * dst_stride..r * dst_stride + width];
            for (a, w) in xr.iter().zip(w.chunks_exact(width)) {
                for (o, w) in out.iter_mut().zip(w) {
                    *o = a.mul_add(*w, *o);
                }
            }
        }
    }

    /// The rows in groups (`group_spans`), their inputs interleaved (`Grouped`), and where
    /// their results go.
    struct Groups<'a> {
        grouped: &'a [f32],
        rows: usize,
        /// Rows per group (`Grouped::height`).
        height: usize,
        k: usize,
        dst: &'a mut [f32],
        dst_stride: usize,
    }

    impl Groups<'_> {
        /// Every group against one block of a panel (steps `k0..`), whose `PANEL` values per
        /// step `vector(step, j)` turns into f32 vector `j`; `next` is the weights after the
        /// block, which the groups prefetch between them while they compute.
        #[target_feature(enable = "avx2,fma,f16c")]
        fn run<T: bytemuck::Pod>(
            &mut self,
            block: &[[T; PANEL]],
            k0: usize,
            next: &[u8],
            vector: impl Fn(&[T; PANEL], usize) -> __m256 + Copy,
        ) {
            let (rows, k, stride) = (self.rows, self.k, self.dst_stride);
            let steps = block.len();
            let groups = rows.div_ceil(self.height);
            for (g, (r, height)) in group_spans(rows, self.height).enumerate() {
                let inputs = &self.grouped[r * k + k0 * height..r * k + (k0 + steps) * height];
                let dst = &mut self.dst[r * stride..];
                let prefetcher =
                    Prefetcher::for_group(next, std::mem::size_of_val(block), steps, groups, g);
                match height {
                    1 => tile::<T, 1>(block, cast_slice(inputs), prefetcher, dst, stride, vector),
                    2 => tile::<T, 2>(block, cast_slice(inputs), prefetcher, dst, stride, vector),
                    _ => tile::<T, 3>(block, cast_slice(inputs), prefetcher, dst, stride, vector),
                }
            }
        }
    }

    /// `R` rows against one block: `R × PANEL` accumulators in registers (12 of AVX2's 16 for
    /// R = 3), one `PANEL`-wide row of weights per step; `inputs[i]` holds the rows' inputs
    /// of step `i`.
    // Index loops on purpose: weight vector outside, rows inside, is the order that keeps
    // the accumulators in registers (see below).
    #[allow(clippy::needless_range_loop)]
    // Out of line: each row count's loop is compiled, and shows in a profile, on its own.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<T, const R: usize>(
        block: &[[T; PANEL]],
        inputs: &[[f32; R]],
        prefetcher: Prefetcher,
        dst: &mut [f32],
        dst_stride: usize,
        vector: impl Fn(&[T; PANEL], usize) -> __m256,
    ) {
        let mut acc = [[_mm256_setzero_ps(); PANEL / 8]; R];
        for r in 0..R {
            let mut row = [0f32; PANEL];
            row.copy_from_slice(&dst[r * dst_stride..r * dst_stride + PANEL]);
            acc[r] = bytemuck::cast::<[f32; PANEL], Row>(row);
        }
        let two_lines = prefetcher.pace > 64;
        let mut ahead = prefetcher.start;
        for (w, x) in block.iter().zip(inputs) {
            prefetch(prefetcher.next, ahead);
            prefetch_to_l2(prefetcher.next, ahead + FAR_AHEAD);
            if two_lines {
                prefetch(prefetcher.next, ahead + 64);
                prefetch_to_l2(prefetcher.next, ahead + 64 + FAR_AHEAD);
            }
            ahead += prefetcher.pace;
            // One weight vector at a time into all R accumulators: 12 accumulators, R
            // broadcasts and one weight vector fit AVX2's 16 registers. (Holding the
            // whole row of weights made the compiler spill two accumulators to the
            // stack, and the store-to-load round trip on them set the pace.)
            let a: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(x[r]));
            for j in 0..PANEL / 8 {
                let w = vector(w, j);
                for r in 0..R {
                    acc[r][j] = _mm256_fmadd_ps(a[r], w, acc[r][j]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let row: [f32; PANEL] = bytemuck::cast(*row);
            dst[r * dst_stride..r * dst_stride + PANEL].copy_from_slice(&row);
        }
    }
}

/// What one group prefetches of the next block while it computes: its share, from
/// `start`, `pace` bytes further at every step. Memory then streams the whole time every
/// group computes (measured end to end: without the prefetch, one- and two-sentence
/// requests took 1.15x and 1.13x as long).
#[derive(Clone, Copy)]
struct Prefetcher<'a> {
    next: &'a [u8],
    start: usize,
    pace: usize,
}

impl Prefetcher<'_> {
    /// The share of group `g` of `groups`, against a block of `steps` steps of `block_bytes`:
    /// the next block, as many bytes as this one, shared out among the groups, each
    /// prefetching its share at an even pace, one or two lines per step.
    fn for_group(
        next: &[u8],
        block_bytes: usize,
        steps: usize,
        groups: usize,
        g: usize,
    ) -> Prefetcher<'_> {
        let share = block_bytes.div_ceil(groups);
        Prefetcher {
            next,
            start: g * share,
            pace: share.div_ceil(steps),
        }
    }
}

/// The few-rows kernel for AVX-512: the AVX2 kernel's computation (each output from its
/// value in `dst`, one fused multiply-add per step in input order) on 16 lanes, with a tile
/// of up to six rows × `PANEL` outputs (12 accumulators).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{
        group_spans, prefetch, prefetch_to_l2, Grouped, Panel, Prefetcher, Weights, FAR_AHEAD,
        K_BLOCK, PANEL,
    };
    use bytemuck::cast_slice;
    use half::f16;
    use std::arch::x86_64::{__m256i, __m512, _mm512_cvtph_ps, _mm512_fmadd_ps, _mm512_set1_ps};

    /// One `PANEL`-wide row of f32 in two vectors.
    type Row = [__m512; PANEL / 16];

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) fn few_rows_product(
        grouped: &Grouped,
        rows: usize,
        panel: Panel,
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        debug_assert_eq!(panel.width, PANEL, "a narrow panel runs narrow_product");
        let k = panel.k;
        // f16 is widened in registers whatever the row count: with 32 registers the widened
        // vector does not push an accumulator out.
        let f32_row = |w: &[f32; PANEL]| bytemuck::cast::<[f32; PANEL], Row>(*w);
        let f16_row = |w: &[f16; PANEL]| {
            let halves: [__m256i; 2] = bytemuck::cast(*w);
            halves.map(|h| _mm512_cvtph_ps(h))
        };
        for k0 in (0..k).step_by(K_BLOCK) {
            let steps = K_BLOCK.min(k - k0);
            let (at, len) = (k0 * PANEL, steps * PANEL);
            let next = panel.weights.bytes_from(at + len);
            let groups = group_spans(rows, grouped.height);
            let count = rows.div_ceil(grouped.height);
            for (g, (r, height)) in groups.enumerate() {
                let inputs = &grouped.values[r * k + k0 * height..r * k + (k0 + steps) * height];
                let dst = &mut dst[r * dst_stride..];
                macro_rules! tile_of {
                    ($block:expr, $row:expr) => {{
                        let block = $block;
                        let p = Prefetcher::for_group(
                            next,
                            std::mem::size_of_val(block),
                            steps,
                            count,
                            g,
                        );
                        match height {
                            1 => tile::<_, 1>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                            2 => tile::<_, 2>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                            3 => tile::<_, 3>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                            4 => tile::<_, 4>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                            5 => tile::<_, 5>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                            _ => tile::<_, 6>(block, cast_slice(inputs), p, dst, dst_stride, $row),
                        }
                    }};
                }
                match panel.weights {
                    Weights::F32(w) => {
                        let block: &[[f32; PANEL]] = cast_slice(&w[at..at + len]);
                        tile_of!(block, f32_row)
                    }
                    Weights::F16(w) => {
                        let block: &[[f16; PANEL]] = cast_slice(&w[at..at + len]);
                        tile_of!(block, f16_row)
                    }
                }
            }
        }
    }

    /// `src` widened into `dst`, 16 values per conversion.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) fn widen(src: &[f16], dst: &mut [f32]) {
        super::widen_by::<16>(src, dst, |h| {
            bytemuck::cast(_mm512_cvtph_ps(bytemuck::cast::<[f16; 16], __m256i>(h)))
        });
    }

    /// `R` rows against one block: `R × 2` accumulators, one row of weights (two vectors)
    /// per step, `inputs[i]` the rows' inputs of step `i`.
    #[allow(clippy::needless_range_loop)] // rows inside: the order that keeps them in registers
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn tile<T, const R: usize>(
        block: &[[T; PANEL]],
        inputs: &[[f32; R]],
        prefetcher: Prefetcher,
        dst: &mut [f32],
        dst_stride: usize,
        row_of: impl Fn(&[T; PANEL]) -> Row,
    ) {
        let mut acc: [Row; R] = std::array::from_fn(|r| {
            let mut row = [0f32; PANEL];
            row.copy_from_slice(&dst[r * dst_stride..r * dst_stride + PANEL]);
            bytemuck::cast::<[f32; PANEL], Row>(row)
        });
        let two_lines = prefetcher.pace > 64;
        let mut ahead = prefetcher.start;
        for (w, x) in block.iter().zip(inputs) {
            prefetch(prefetcher.next, ahead);
            prefetch_to_l2(prefetcher.next, ahead + FAR_AHEAD);
            if two_lines {
                prefetch(prefetcher.next, ahead + 64);
                prefetch_to_l2(prefetcher.next, ahead + 64 + FAR_AHEAD);
            }
            ahead += prefetcher.pace;
            let w = row_of(w);
            for r in 0..R {
                let a = _mm512_set1_ps(x[r]);
                acc[r][0] = _mm512_fmadd_ps(a, w[0], acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, w[1], acc[r][1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let row: [f32; PANEL] = bytemuck::cast(*row);
            dst[r * dst_stride..r * dst_stride + PANEL].copy_from_slice(&row);
        }
    }
}

/// How far past the block being prefetched into L1 the few-rows kernel also asks for lines
/// into L2: a short request's product streams weights that, after the worker sat idle for a
/// while, seem to come from memory rather than L3 (such a pass takes 1.65 ms back to back,
/// 3.0 ms after 200 ms idle), and one block ahead (16 KiB) kept too few lines in flight.
/// Measured side by side on the AVX-512 kernel (`bench/ab.py`, one sentence, 31 repeats 50 ms
/// apart): passes 0.92-0.94x the time with 24, 48 or 96 KiB ahead, 8 sentences (the
/// many-rows kernel) level. The AVX2 kernel, which streams the same blocks, does the same.
const FAR_AHEAD: usize = 48 * 1024;

/// Asks the CPU to bring the cache line holding `data[at]` into L2 (and L3), not L1: for
/// lines needed a few blocks later. Nothing past the end, as `prefetch`.
#[inline(always)]
fn prefetch_to_l2(data: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(byte) = data.get(at) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: as in `prefetch`.
        unsafe { _mm_prefetch::<_MM_HINT_T1>((byte as *const u8).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

/// Asks the CPU to bring the cache line holding `data[at]` into L1; nothing past the end
/// (the last block's next lies beyond the matrix: memory the product will not read, maybe
/// not even mapped).
#[inline(always)]
pub(super) fn prefetch(data: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(byte) = data.get(at) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: the instruction is SSE, which every x86_64 CPU has; the address is that of
        // a byte of `data`, and a prefetch changes nothing the program can observe.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((byte as *const u8).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x · Wᵀ + b` by the definition, in f64, from PyTorch's `[out, in]` layout.
    fn linear_by_definition(
        w: &[f32],
        bias: &[f32],
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                out[r * n + j] = (dot + bias[j] as f64) as f32;
            }
        }
        out
    }

    /// Every route this CPU can run, so that both kernels are tested whatever the row count.
    fn routes(k: usize) -> Vec<Route> {
        let mut routes = vec![Route::Gemm {
            chunk: chunk_rows(k),
        }];
        for isa in available_isas() {
            routes.extend([Route::FewRows(isa), Route::ManyRows(isa)]);
        }
        routes
    }

    fn run(linear: &Linear, x: &[f32], rows: usize, route: Route) -> Vec<f32> {
        let n = linear.outputs;
        let mut got = vec![f32::NAN; rows * n];
        linear.panels_by(x, rows, 0, n, &mut got, n, route);
        got
    }

    /// bf16 through `forward`, as the encoder calls it, one thread and two (each a share of
    /// the outputs): the definition on the rounded inputs and weights, and a row's bits the
    /// same alone as among others. Where the CPU has no AMX, the precision is refused.
    #[test]
    fn bf16_products_equal_the_definition() {
        let bf = |v: f32| amx::from_bf16(amx::to_bf16(v));
        for (k, n) in [(384, 1152), (40, 37), (1536, 384), (577, 33)] {
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
            let linear =
                match Linear::from_torch(&w, bias.clone(), k, n).in_precision(Precision::Bf16) {
                    Ok(linear) => linear,
                    Err(why) => {
                        assert_eq!(
                            Err(why.clone()),
                            amx::enable(),
                            "refused only for want of AMX"
                        );
                        eprintln!("skipped: {why}");
                        return;
                    }
                };
            let rounded: Vec<f32> = w.iter().map(|&v| bf(v)).collect();
            for rows in [1, 7, 16, 17, 33, 127] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 104_729 % 613) as f32 - 300.0) / 611.0)
                    .collect();
                let x_rounded: Vec<f32> = x.iter().map(|&v| bf(v)).collect();
                let expected = linear_by_definition(&rounded, &bias, &x_rounded, rows, k, n);
                let mut first = Vec::new();
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; rows * n];
                    linear.forward(&x, rows, &mut got, threads);
                    for (a, b) in got.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "k {k} n {n} rows {rows} threads {threads}: {a} vs {b}"
                        );
                    }
                    match threads {
                        1 => first = got,
                        _ => assert_eq!(got, first, "k {k} n {n} rows {rows}: by threads"),
                    }
                }
                let last = rows - 1;
                let mut alone = vec![f32::NAN; n];
                linear.forward(&x[last * k..], 1, &mut alone, 1);
                assert_eq!(alone, first[last * n..], "k {k} n {n}: row {last} alone");
            }
        }
    }

    /// The packed product against the definition, by both routes, in both precisions: row
    /// counts around the tiles' heights, widths that are and are not multiples of the panel
    /// width, inputs longer than a block; and `forward` with one and two threads. In f16 the
    /// definition is computed from the rounded weights: only the storage differs.
    #[test]
    fn packed_products_equal_the_definition() {
        // (800, 70): more steps than the many-rows kernel's block, and a narrow last panel;
        // (37, 64) and (577, 33): an odd number of steps in a block (the tiles take two at a
        // time), and a last block of one step on AVX-512 (577 = 3 x 192 + 1).
        for (k, n) in [
            (32, 96),
            (40, 37),
            (24, 300),
            (384, 1152),
            (300, 64),
            (800, 70),
            (37, 64),
            (577, 33),
        ] {
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
            for precision in [Precision::F32, Precision::F16] {
                let stored: Vec<f32> = match precision {
                    Precision::F32 => w.clone(),
                    Precision::F16 => w.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                    Precision::Bf16 => unreachable!("bf16_products_equal_the_definition"),
                };
                let linear = Linear::from_torch(&w, bias.clone(), k, n)
                    .in_precision(precision)
                    .unwrap();
                // 127: more than one block of strips, the last strip not full.
                for rows in [1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 40, 127] {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| ((i * 104_729 % 613) as f32 - 300.0) / 611.0)
                        .collect();
                    let expected = linear_by_definition(&stored, &bias, &x, rows, k, n);
                    let check = |got: &[f32], how: &str| {
                        for (a, b) in got.iter().zip(&expected) {
                            assert!(
                                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{precision:?} k {k} n {n} rows {rows} {how}: {a} vs {b}"
                            );
                        }
                    };
                    for route in routes(k) {
                        let how = match route {
                            Route::FewRows(isa) => format!("few rows, {isa:?}"),
                            Route::ManyRows(isa) => format!("many rows, {isa:?}"),
                            Route::Gemm { .. } => "gemm".to_string(),
                        };
                        check(&run(&linear, &x, rows, route), &how);
                    }
                    for threads in [1, 2] {
                        let mut got = vec![f32::NAN; rows * n];
                        linear.forward(&x, rows, &mut got, threads);
                        check(&got, "forward");
                    }
                }
            }
        }
    }

    /// A row's result does not depend on the other rows it is computed with (a sentence's
    /// vector must not depend on which requests shared its pass): each row alone against the
    /// same row inside 2 rows up to more than two blocks of strips, by the route each count
    /// takes (both sides of `FEW_ROWS`). With the AVX2 kernels the bits are the same; gemm
    /// (other CPUs) may round differently.
    #[test]
    fn a_row_does_not_depend_on_its_neighbours() {
        // 800 inputs: more than one block of steps for either kernel; 102 outputs: three full
        // panels (a tile of two and a tile of one with AVX-512) and a narrow last one.
        let (k, n) = (800, 102);
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 997.0)
            .collect();
        // Row counts on both sides of FEW_ROWS and of a block of strips, and over two blocks.
        let block = many_rows::block_strips(k) * many_rows::STRIP;
        let counts = [2, 3, 4, 9, 40, 41, 127, 200, block + 5, 2 * block + 7];
        let x: Vec<f32> = (0..(2 * block + 7) * k)
            .map(|i| ((i * 104_729 % 613) as f32 - 300.0) / 611.0)
            .collect();
        for precision in [Precision::F32, Precision::F16] {
            let linear = Linear::from_torch(&w, vec![0.25; n], k, n)
                .in_precision(precision)
                .unwrap();
            let alone: Vec<Vec<f32>> = x
                .chunks_exact(k)
                .map(|row| {
                    let mut out = vec![0f32; n];
                    linear.forward(row, 1, &mut out, 1);
                    out
                })
                .collect();
            for rows in counts {
                let mut together = vec![0f32; rows * n];
                linear.forward(&x, rows, &mut together, 1);
                // Relative to the output's size (up to ~10 here).
                let worst = together
                    .chunks_exact(n)
                    .zip(&alone)
                    .flat_map(|(t, a)| {
                        t.iter()
                            .zip(a)
                            .map(|(t, a)| (t - a).abs() / (1.0 + a.abs()))
                    })
                    .fold(0f32, f32::max);
                let bound = if few_rows_available() { 0.0 } else { 1e-5 };
                assert!(
                    worst <= bound,
                    "{precision:?}, rows {rows}: moved by {worst}"
                );
                // Every kernel on every instruction set this CPU has: the same bits.
                for route in routes(k).into_iter().skip(1) {
                    let got = run(&linear, &x, rows, route);
                    for (r, (got, alone)) in got.chunks_exact(n).zip(&alone).enumerate() {
                        assert!(
                            got == alone.as_slice(),
                            "{precision:?}, rows {rows}, row {r}: not the same bits by {}",
                            match route {
                                Route::FewRows(isa) => format!("few rows, {isa:?}"),
                                Route::ManyRows(isa) => format!("many rows, {isa:?}"),
                                Route::Gemm { .. } => "gemm".to_string(),
                            }
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn groups_cover_the_rows_in_order_and_evenly() {
        for height in [2, 3] {
            for rows in 0..40 {
                let spans: Vec<(usize, usize)> = group_spans(rows, height).collect();
                assert_eq!(spans.len(), rows.div_ceil(height), "rows {rows}");
                let mut next = 0;
                for &(first, h) in &spans {
                    assert_eq!(first, next, "rows {rows}: {spans:?}");
                    assert!((1..=height).contains(&h), "rows {rows}: {spans:?}");
                    next += h;
                }
                assert_eq!(next, rows);
                let (low, high) = spans
                    .iter()
                    .fold((usize::MAX, 0), |(l, h), s| (l.min(s.1), h.max(s.1)));
                assert!(
                    spans.is_empty() || high - low <= 1,
                    "rows {rows}: {spans:?}"
                );
            }
        }
        assert_eq!(
            group_spans(10, 3).collect::<Vec<_>>(),
            [(0, 3), (3, 3), (6, 2), (8, 2)]
        );
    }

    #[test]
    fn weights_beyond_half_range_are_refused() {
        let err = Linear::from_torch(&[1.0, 7e4], vec![0.0], 2, 1)
            .in_precision(Precision::F16)
            .err()
            .unwrap();
        assert!(err.contains("70000") && err.contains("65504"), "{err}");
        let l = Linear::from_torch(&[1.0, 6e4], vec![0.0], 2, 1);
        assert_eq!(l.weight_bytes(), 8);
        let l = l.in_precision(Precision::F16).unwrap();
        assert_eq!(l.weight_bytes(), 4);
    }

    /// bf16 rounds f32's largest values up to infinity: refused, where AMX runs at all.
    #[test]
    fn weights_beyond_bf16_range_are_refused() {
        if let Err(why) = amx::enable() {
            eprintln!("skipped: {why}");
            return;
        }
        let err = Linear::from_torch(&[1.0, f32::MAX], vec![0.0], 2, 1)
            .in_precision(Precision::Bf16)
            .err()
            .unwrap();
        assert!(err.contains("bfloat16's range"), "{err}");
        // 3e38 rounds to bf16's largest finite value.
        let l = Linear::from_torch(&[1.0, 3e38], vec![0.0], 2, 1)
            .in_precision(Precision::Bf16)
            .unwrap();
        // One output padded to a panel of 32, two inputs to a step of 32: 1,024 bf16 values.
        assert_eq!(l.weight_bytes(), 2048);
    }

    #[test]
    fn parts_pack_side_by_side() {
        // PyTorch [out=3, in=2] and [out=1, in=2]: y = x·Wᵀ + b.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let l = Linear::from_torch(&w, vec![0.5, 0.0, -0.5], 2, 3);
        let mut out = [0.0; 3];
        l.forward(&[1.0, 1.0], 1, &mut out, 1);
        assert_eq!(out, [3.5, 7.0, 10.5]);
        let wide = Linear::from_torch_parts(&[(&w, &[0.5, 0.0, -0.5]), (&[1.0, 0.0], &[0.0])], 2);
        let mut out = [0.0; 4];
        wide.forward(&[1.0, 1.0], 1, &mut out, 1);
        assert_eq!(out, [3.5, 7.0, 10.5, 1.0]);
    }

    /// Median microseconds of `f` over `runs` calls.
    fn median_us(runs: usize, mut f: impl FnMut()) -> f64 {
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[runs / 2]
    }

    /// The many-rows kernel alone on the four products of a MiniLM layer, 210 rows (a pass of
    /// 30 one-sentence requests), weights in cache: GFLOP/s by instruction set. `cargo test
    /// --release -p forkserve-worker many_rows_product_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn many_rows_product_speed() {
        for (k, n) in [(384, 1152), (384, 384), (384, 1536), (1536, 384)] {
            let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 / 13.0).collect();
            let l = Linear::from_torch(&w, vec![0.0; n], k, n);
            let rows = 210;
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 / 7.0).collect();
            let mut out = vec![0f32; rows * n];
            let mut line = Vec::new();
            for isa in available_isas() {
                let us = median_us(21, || {
                    for _ in 0..10 {
                        l.panels_by(&x, rows, 0, n, &mut out, n, Route::ManyRows(isa));
                    }
                }) / 10.0;
                let gflops = 2.0 * (rows * k * n) as f64 / us / 1e3;
                line.push(format!("{} {us:7.1} us ({gflops:5.1} GFLOP/s)", isa.name()));
            }
            eprintln!("k {k:4} n {n:4}: {}", line.join(", "));
        }
    }

    /// Large products, alternating chunked and unchunked input (the activations of a large
    /// batch do not fit L2): `cargo test --release -p forkserve-worker chunked_product_speed --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn chunked_product_speed() {
        for (k, n) in [(384, 1152), (1536, 384)] {
            let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 / 13.0).collect();
            let l = Linear::from_torch(&w, vec![0.0; n], k, n);
            for rows in [128, 512, 3000] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 / 7.0).collect();
                let mut out = vec![0f32; rows * n];
                let mut time = |chunk| {
                    median_us(7, || {
                        l.panels_by(&x, rows, 0, n, &mut out, n, Route::Gemm { chunk })
                    })
                };
                let (chunked, whole) = (time(chunk_rows(k)), time(usize::MAX));
                let gflops = |us: f64| 2.0 * (rows * k * n) as f64 / us / 1e3;
                eprintln!(
                    "{k}x{n}, rows {rows:5}: chunks of {}: {chunked:8.0} us ({:5.1} GFLOP/s), whole: {whole:8.0} us ({:5.1})",
                    chunk_rows(k),
                    gflops(chunked),
                    gflops(whole)
                );
            }
        }
    }

    /// The routes and precisions side by side, as in a forward pass where the weights are out
    /// of cache (40 matrices of 1.7 MB in f32 cycled, more than the caches; medians of 9
    /// rounds, the six variants interleaved within each round): `cargo test --release -p
    /// forkserve-worker packed_product_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn packed_product_speed() {
        for (k, n) in [(384, 1152), (1536, 384)] {
            product_speed_of(k, n);
        }
    }

    fn product_speed_of(k: usize, n: usize) {
        let mats = 40;
        let layers = |precision| -> Vec<Linear> {
            (0..mats)
                .map(|m| {
                    let w: Vec<f32> = (0..k * n).map(|i| ((i + m) % 13) as f32 / 13.0).collect();
                    Linear::from_torch(&w, vec![0.0; n], k, n)
                        .in_precision(precision)
                        .unwrap()
                })
                .collect()
        };
        let (f32s, f16s) = (layers(Precision::F32), layers(Precision::F16));
        for rows in [1, 4, 9, 16, 32, 48, 64, 128, 256, 512] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 / 7.0).collect();
            let mut out = vec![0f32; rows * n];
            let gemm = Route::Gemm {
                chunk: chunk_rows(k),
            };
            let mut variants = vec![
                ("gemm f32".to_string(), &f32s, gemm),
                ("gemm f16".to_string(), &f16s, gemm),
            ];
            for isa in available_isas() {
                for (precision, linears) in [("f32", &f32s), ("f16", &f16s)] {
                    let name = isa.name();
                    variants.push((
                        format!("few-rows {name} {precision}"),
                        linears,
                        Route::FewRows(isa),
                    ));
                    variants.push((
                        format!("many-rows {name} {precision}"),
                        linears,
                        Route::ManyRows(isa),
                    ));
                }
            }
            let mut times = vec![Vec::new(); variants.len()];
            for _ in 0..9 {
                for (v, (_, linears, route)) in variants.iter().enumerate() {
                    let t = std::time::Instant::now();
                    for l in linears.iter() {
                        l.panels_by(&x, rows, 0, n, &mut out, n, *route);
                    }
                    times[v].push(t.elapsed().as_secs_f64() / mats as f64 * 1e6);
                }
            }
            let line: Vec<String> = variants
                .iter()
                .zip(&mut times)
                .map(|((name, _, _), t)| {
                    t.sort_by(f64::total_cmp);
                    let us = t[t.len() / 2];
                    format!(
                        "{name} {us:6.1} us ({:4.1} GFLOP/s)",
                        2.0 * (rows * k * n) as f64 / us / 1e3
                    )
                })
                .collect();
            eprintln!("{k}x{n}, rows {rows:3}: {}", line.join(", "));
        }
    }

    /// The kernels' compute speed with the weights in L2 (a 384 × 128 matrix, 196 KB, used
    /// 200 times in a row; median of 9 such runs), by route and precision: `cargo test --release -p
    /// forkserve-worker hot_product_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hot_product_speed() {
        let (k, n) = (384, 128);
        let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 / 13.0).collect();
        for precision in [Precision::F32, Precision::F16] {
            let l = Linear::from_torch(&w, vec![0.0; n], k, n)
                .in_precision(precision)
                .unwrap();
            for rows in [1, 3, 9, 32] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 / 7.0).collect();
                let mut out = vec![0f32; rows * n];
                let mut line = Vec::new();
                let mut routes = vec![("gemm", Route::Gemm { chunk: 512 })];
                for isa in available_isas() {
                    routes.push((isa.name(), Route::FewRows(isa)));
                }
                for (name, route) in routes {
                    let us = median_us(9, || {
                        for _ in 0..200 {
                            l.panels_by(&x, rows, 0, n, &mut out, n, route);
                        }
                    }) / 200.0;
                    let gflops = 2.0 * (rows * k * n) as f64 / us / 1e3;
                    line.push(format!("{name} {us:6.1} us ({gflops:4.1} GFLOP/s)"));
                }
                eprintln!("{precision:?} rows {rows:2}: {}", line.join(", "));
            }
        }
    }
}
