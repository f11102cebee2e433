//! The numeric kernels of the forward pass in `fast.rs`: matrix product (gemm), layer norm,
//! softmax and GELU. Public so that `benches/kernels.rs` can time each one alone.
//!
//! The element-wise kernels are plain loops without branches, compiled three times by
//! `multiversion` (AVX-512, AVX2+FMA, baseline SSE2) and dispatched on the CPU found at run
//! time: the release binary stays portable, yet uses the widest vectors the machine has.
//! Profiling a worker under load (`perf record`, 9-title `/cluster` requests) showed
//! `libm::erff` + `expf` at 28 % of all cycles before this module: they are scalar calls that
//! stop the loops from vectorising. `exp` and `erf` here are branch-free polynomials that do.

use multiversion::multiversion;
use rayon::prelude::*;

/// `x = LayerNorm(x + residual)` over one row, with weight `gamma` and bias `beta`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn layer_norm(x: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
    if let Some(r) = residual {
        x.iter_mut().zip(r).for_each(|(a, b)| *a += b);
    }
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// Softmax over one row, in place.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}

/// BERT's GELU, the exact (erf) form `x/2 · (1 + erf(x/√2))`, in place.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn gelu_erf(x: &mut [f32]) {
    x.iter_mut()
        .for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
}

/// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`):
/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))`, with `tanh(u) = 1 − 2/(e^{2u} + 1)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn gelu_tanh(x: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    x.iter_mut().for_each(|v| {
        let u = SQRT_2_OVER_PI * (*v + 0.044_715 * *v * *v * *v);
        let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
        *v = 0.5 * *v * (1.0 + tanh);
    });
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// SiLU (swish): `x · sigmoid(x)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn silu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v /= 1.0 + exp(-*v));
}

/// `e^x` for f32, branch-free so that loops over it vectorise. Relative error below 2e-7 from
/// -87.33 to 88 (tested against `f32::exp`); below -87.33 (f32's smallest normal) it returns
/// e^-87.33 ≈ 1.2e-38, and above 88 it returns e^88 ≈ 1.7e38 instead of growing to infinity.
/// The callers only pass `x ≤ 0` (softmax after subtracting the maximum, erf's `-x²`).
///
/// Method: `e^x = 2^n · e^r` with `n = round(x·log2 e)` and `|r| ≤ ln2/2`, `e^r` by its Taylor
/// series to degree 7 (error term `0.347^8/8! ≈ 5e-9`), `2^n` built from the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split in two so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to an integer in the low mantissa bits, with no branch and no
    // float→int conversion.
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    p * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// `erf(x)` for f32, branch-free, absolute error below 6e-7 (tested against `libm::erff`:
/// the formula's 1.5e-7 plus f32 rounding, a few units in the last place of 1.0).
/// Abramowitz & Stegun, *Handbook of Mathematical Functions* (1964), formula 7.1.26:
/// `erf(x) = 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^(−x²)` with `t = 1/(1 + p·x)`, `x ≥ 0`,
/// stated there with error ≤ 1.5e-7; erf is odd, so the sign is put back at the end.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// A weight matrix packed once at load into panels of `PANEL` outputs: panel `p` holds
/// outputs `p·PANEL..` as a row-major `[in, PANEL]` block (the last one narrower), so the
/// matrix is read as one sequential stream, panel after panel. Built in the master before
/// fork, so the packed copy is shared by every worker.
///
/// Why: a short request's forward pass is bound by reading the weights from memory (they
/// do not fit the cache; every product reads each weight once). Read in PyTorch's `[out,
/// in]` layout, gemm repacked every weight on every call (85 % of a one-sentence request's
/// time, measured by perf); read from a row-major `[in, out]` copy, each step jumped a whole
/// row ahead. Measured by the ignored test `packed_product_speed` on the 384 × 1152 product.
pub struct Linear {
    packed: Vec<f32>,
    bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

/// Outputs per panel: one 128-byte row per input, two cache lines read in order; wide enough
/// for gemm's widest micro-kernel (16 columns with AVX2, 32 with AVX-512) to run full.
const PANEL: usize = 32;

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
        let mut packed = vec![0f32; inputs * outputs];
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
            packed,
            bias,
            inputs,
            outputs,
        }
    }

    /// The panels in order: (first output, width, packed `[inputs, width]` block).
    fn panels(&self) -> impl Iterator<Item = (usize, usize, &[f32])> + '_ {
        let k = self.inputs;
        (0..self.outputs).step_by(PANEL).map(move |first| {
            let width = PANEL.min(self.outputs - first);
            (first, width, &self.packed[first * k..(first + width) * k])
        })
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
        let panels = n.div_ceil(PANEL);
        if threads <= 1 || panels < 2 {
            self.panels_into(x, rows, 0, n, out, n);
            return;
        }
        let per_thread = panels.div_ceil(threads.min(panels)) * PANEL;
        let firsts: Vec<usize> = (0..n).step_by(per_thread).collect();
        let shares: Vec<(usize, usize, Vec<f32>)> = firsts
            .into_par_iter()
            .map(|first| {
                let width = per_thread.min(n - first);
                let mut part = vec![0f32; rows * width];
                self.panels_into(x, rows, first, first + width, &mut part, width);
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
        let k = self.inputs;
        for r in 0..rows {
            dst[r * dst_stride..r * dst_stride + (to - from)].copy_from_slice(&self.bias[from..to]);
        }
        self.panels_into_by(x, rows, from, to, dst, dst_stride, chunk_rows(k));
    }

    /// The same, `chunk` rows of the input at a time: each chunk stays in L2 while every
    /// panel passes over it (a panel call over all rows re-read the whole input from memory
    /// for each 32 outputs).
    #[allow(clippy::too_many_arguments)]
    fn panels_into_by(
        &self,
        x: &[f32],
        rows: usize,
        from: usize,
        to: usize,
        dst: &mut [f32],
        dst_stride: usize,
        chunk: usize,
    ) {
        let k = self.inputs;
        let count = (to - from).div_ceil(PANEL);
        for r0 in (0..rows).step_by(chunk) {
            let chunk_rows = chunk.min(rows - r0);
            let lhs = MatRef::new(&x[r0 * k..], chunk_rows, k, k, 1);
            let dst = &mut dst[r0 * dst_stride..];
            for (first, width, panel) in self.panels().skip(from / PANEL).take(count) {
                let rhs = MatRef::new(panel, k, width, width, 1);
                matmul(
                    &mut dst[first - from..],
                    dst_stride,
                    1,
                    true,
                    lhs,
                    rhs,
                    1.0,
                    1,
                );
            }
        }
    }
}

/// Input rows per chunk of a product: about 768 KiB of activations (most of a 1 MiB L2), and
/// never fewer than 128 rows. Measured by `chunked_product_speed`: at 3,000 rows chunks run
/// 1.7–1.8× as fast as one call over all rows; up to 512 rows the two are within the noise.
fn chunk_rows(inputs: usize) -> usize {
    (196_608 / inputs.max(1)).max(128)
}

/// A strided view of `rows × cols` f32 values inside a slice.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// Panics if the view reaches past the slice: every caller builds views from sizes it
    /// computed itself, so this is a bug check, not input validation.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> MatRef<'a> {
        let view = MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        assert!(view.fits(data.len()), "matrix view out of bounds");
        view
    }

    /// Whether the last element lies inside a slice of `len` values.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// `dst = (read_dst ? dst : 0) + scale · lhs · rhs`, with `dst` a `lhs.rows × rhs.cols` view
/// of `dst` (row stride `dst_rs`, column stride `dst_cs`). gemm picks its AVX-512 or AVX2
/// micro-kernel at run time (the `x86-v4` feature adds the AVX-512 one).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    let out = MatRef {
        data: &[],
        rows: m,
        cols: n,
        row_stride: dst_rs,
        col_stride: dst_cs,
    };
    assert!(out.fits(dst.len()), "destination out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = match threads {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: every element gemm reads or writes is inside its slice: `MatRef::new` and the
    // assertion above check that the last element of each strided view is in bounds (and
    // strides are non-negative, so every other element is before it). `dst` is borrowed
    // mutably and the inputs immutably, so the output cannot alias an input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            read_dst,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_with_strides_and_accumulation() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [1.0; 4];
        matmul(
            &mut c,
            2,
            1,
            true,
            MatRef::new(&a, 2, 2, 2, 1),
            MatRef::new(&b, 2, 2, 2, 1),
            1.0,
            1,
        );
        assert_eq!(c, [20.0, 23.0, 44.0, 51.0]);
        // Bᵀ through strides, scaled, not accumulating: [1 2; 3 4] · [5 7; 6 8] / 2.
        let mut c = [0.0; 4];
        matmul(
            &mut c,
            2,
            1,
            false,
            MatRef::new(&a, 2, 2, 2, 1),
            MatRef::new(&b, 2, 2, 1, 2),
            0.5,
            1,
        );
        assert_eq!(c, [8.5, 11.5, 19.5, 26.5]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn views_past_the_slice_are_refused() {
        MatRef::new(&[0.0; 5], 2, 3, 3, 1);
    }

    #[test]
    fn softmax_and_layer_norm() {
        let mut r = [1.0, 2.0, 3.0];
        softmax(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6 && r[2] > r[1] && r[1] > r[0]);
        let expected = [1.0f32.exp(), 2.0f32.exp(), 3.0f32.exp()];
        let sum: f32 = expected.iter().sum();
        for (got, want) in r.iter().zip(expected) {
            assert!((got - want / sum).abs() < 1e-7);
        }
        let mut x = [1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, Some(&[1.0; 4]), &[1.0; 4], &[0.0; 4], 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    /// Every 1/1000 from -100 to 88, against the standard library's correctly rounded `exp`.
    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f32;
        for i in -100_000..=88_000 {
            let x = i as f32 / 1000.0;
            let want = x.exp();
            let got = exp(x);
            if x < -87.33 {
                assert!(got.abs() < 1.3e-38, "exp({x}) = {got}, want ~0");
                continue;
            }
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.33));
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Every 1/10000 from -6 to 6 (erf is ±1 to f32 precision beyond), against libm's erff.
    #[test]
    fn erf_is_accurate_over_the_range() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 6e-7, "worst absolute error {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

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

    /// The packed product against the definition: row counts around gemm's tile heights,
    /// widths that are and are not multiples of the panel width, one and two threads.
    #[test]
    fn packed_products_equal_the_definition() {
        for (k, n) in [(32, 96), (40, 37), (24, 300), (384, 1152)] {
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
            let linear = Linear::from_torch(&w, bias.clone(), k, n);
            for rows in [1, 2, 3, 5, 7, 8, 9, 13, 17, 40] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 104_729 % 613) as f32 - 300.0) / 611.0)
                    .collect();
                let expected = linear_by_definition(&w, &bias, &x, rows, k, n);
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; rows * n];
                    linear.forward(&x, rows, &mut got, threads);
                    for (a, b) in got.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "k {k} n {n} rows {rows}: {a} vs {b}"
                        );
                    }
                }
            }
        }
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
                let (mut chunked, mut whole) = (Vec::new(), Vec::new());
                for _ in 0..7 {
                    for (chunk, times) in [(chunk_rows(k), &mut chunked), (usize::MAX, &mut whole)]
                    {
                        let t = std::time::Instant::now();
                        l.panels_into_by(&x, rows, 0, n, &mut out, n, chunk);
                        times.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                chunked.sort_by(f64::total_cmp);
                whole.sort_by(f64::total_cmp);
                let gflops = |us: f64| 2.0 * (rows * k * n) as f64 / us / 1e3;
                eprintln!(
                    "{k}x{n}, rows {rows:5}: chunks of {}: {:8.0} us ({:5.1} GFLOP/s), whole: {:8.0} us ({:5.1})",
                    chunk_rows(k),
                    chunked[3],
                    gflops(chunked[3]),
                    whole[3],
                    gflops(whole[3])
                );
            }
        }
    }

    /// Timing, by hand, as in a forward pass where the weights are out of cache (40 matrices
    /// of 1.7 MB cycled, more than the caches), and in cache: `cargo test --release -p
    /// forkserve-worker packed_product_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn packed_product_speed() {
        let (k, n) = (384, 1152);
        let mats = 40;
        let linears: Vec<Linear> = (0..mats)
            .map(|m| {
                let w: Vec<f32> = (0..k * n).map(|i| ((i + m) % 13) as f32 / 13.0).collect();
                Linear::from_torch(&w, vec![0.0; n], k, n)
            })
            .collect();
        for rows in [1, 2, 4, 8, 16, 32, 64, 128, 512] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 / 7.0).collect();
            let mut out = vec![0f32; rows * n];
            let gflops = |us: f64| 2.0 * (rows * k * n) as f64 / us / 1e3;
            for threads in [1, 2] {
                let t = std::time::Instant::now();
                for _ in 0..3 {
                    for l in &linears {
                        l.forward(&x, rows, &mut out, threads);
                    }
                }
                let cold = t.elapsed().as_secs_f64() / (3 * mats) as f64 * 1e6;
                let t = std::time::Instant::now();
                for _ in 0..100 {
                    linears[0].forward(&x, rows, &mut out, threads);
                }
                let warm = t.elapsed().as_secs_f64() / 100.0 * 1e6;
                eprintln!(
                    "rows {rows:3}, threads {threads}: cold {cold:7.1} us ({:5.1} GFLOP/s), warm {warm:7.1} us ({:5.1})",
                    gflops(cold),
                    gflops(warm)
                );
            }
        }
    }

    #[test]
    fn other_activations_match_their_definitions() {
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 / 10.0).collect();
        let mut tanh = xs.clone();
        gelu_tanh(&mut tanh);
        let mut swish = xs.clone();
        silu(&mut swish);
        let mut r = xs.clone();
        relu(&mut r);
        for (i, &x) in xs.iter().enumerate() {
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (tanh[i] - want).abs() < 2e-6,
                "gelu_tanh({x}) = {} vs {want}",
                tanh[i]
            );
            let want = x / (1.0 + (-x).exp());
            assert!((swish[i] - want).abs() < 2e-6, "silu({x})");
            assert_eq!(r[i], x.max(0.0));
        }
    }

    #[test]
    fn gelu_matches_known_values() {
        let mut v = [0.0, 1.0, -1.0, 3.0, -3.0];
        gelu_erf(&mut v);
        let want = [0.0, 0.841_344_7, -0.158_655_26, 2.995_950_3, -0.004_049_7];
        for (got, want) in v.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
