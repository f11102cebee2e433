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
use multiversion::target::selected_target;

/// `x = LayerNorm(x + residual)` over one row, with weight `gamma` and bias `beta`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn layer_norm(x: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
    if let Some(r) = residual {
        x.iter_mut().zip(r).for_each(|(a, b)| *a += b);
    }
    let n = x.len() as f32;
    let mean = sum_by(x, |v| v) / n;
    let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// `Σ f(v)` over `x`, kept in `LANES` running sums. One running sum is a chain of dependent
/// additions that the compiler must keep in order (float addition is not associative), so it
/// neither vectorises nor overlaps: layer norm took ~7 cycles per value that way, 3.8x its
/// time with the lanes (`make bench-kernels`). Independent lanes become a few vector
/// accumulators.
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 32;
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Softmax over each row of `n` values of `rows`, in place. The exponentials of the whole
/// block in one loop: a short sentence's rows (7 or so values) were each too short for the
/// vector loop, so every value took the scalar `exp` (1.2 % of a 32-connection pass's
/// cycles, perf). The same operations on every value as row by row.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn softmax(rows: &mut [f32], n: usize) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    for row in rows.chunks_exact_mut(n.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v -= max);
    }
    rows.iter_mut().for_each(|v| *v = exp::<FMA>(*v));
    for row in rows.chunks_exact_mut(n.max(1)) {
        let inv = 1.0 / sum_by(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One attention head of one sentence, read in place from the packed `[tokens, 3·hidden]`
/// QKV buffer: token `i`'s query is `q[i·stride..][..d]`, its key `k[i·stride..][..d]`, its
/// value `v[i·stride..][..d]`.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    /// Tokens.
    pub n: usize,
    /// Values per token in this head.
    pub d: usize,
}

/// One head's attention scores over one sentence of `n` tokens: `scores[i·n + j] = scale ·
/// Σ_c q_i[c]·k_j[c]`. For short sentences, in place of two gemm calls per head: on ~10
/// tokens a call's fixed costs outweighed its arithmetic (gemm's attention products took ~5 %
/// of a pass, perf).
///
/// With AVX2 and FMA, and `d` a multiple of 8: eight dot products at a time in vector
/// registers, reduced together (`avx2::scores`). The portable loops spent 5 % of a 32-sentence
/// pass here, for 0.2 % of its arithmetic: loops over the ~10 keys of a row spend their time
/// starting and ending, and the compiler turned dot products over `d` into half-empty vectors.
/// `kt` (at least `n·d` values) is the portable loops' room for K transposed.
pub fn attention_scores(head: HeadRows<'_>, scale: f32, kt: &mut [f32], scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if head.d.is_multiple_of(8) && avx2_fma_available() {
        // SAFETY: the function is compiled for AVX2 and FMA, and the CPU has them (checked
        // just above); it is otherwise safe code.
        unsafe { avx2::scores(head, scale, scores) };
        return;
    }
    portable_scores(head, scale, kt, scores);
}

/// `attention_scores` on any CPU: each row a sum of K's columns (K transposed into `kt`)
/// scaled by q's values.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn portable_scores<'a>(head: HeadRows<'a>, scale: f32, kt: &mut [f32], scores: &mut [f32]) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    let HeadRows {
        q, k, stride, n, d, ..
    } = head;
    let kt = &mut kt[..d * n];
    for j in 0..n {
        for (c, &v) in k[j * stride..j * stride + d].iter().enumerate() {
            kt[c * n + j] = v;
        }
    }
    for (i, row) in scores[..n * n].chunks_exact_mut(n).enumerate() {
        row.fill(0.0);
        for (&a, column) in q[i * stride..i * stride + d].iter().zip(kt.chunks_exact(n)) {
            row.iter_mut()
                .zip(column)
                .for_each(|(s, &k)| *s = mul_add::<FMA>(a, k, *s));
        }
        row.iter_mut().for_each(|s| *s *= scale);
    }
}

/// Whether this CPU has AVX2 and FMA (x86 CPUs since 2013-2015), which forkserve's own
/// intrinsics kernels are written for: the attention scores here, the many-rows product.
pub fn avx2_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One head's output over one sentence of `n` tokens: `out_i = Σ_j p[i·n + j] · v_j`, into
/// `out[i·out_stride..][..d]`; the companion of `attention_scores`. Each output row is summed
/// in registers, 32 values at a time, over all the keys before it is stored (read and written
/// back for every key, it cost 2 % of a 32-sentence pass). Every value is the sum over the
/// keys in order, from zero.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn attention_values<'a>(head: HeadRows<'a>, p: &[f32], out: &mut [f32], out_stride: usize) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    let HeadRows {
        v, stride, n, d, ..
    } = head;
    for (i, weights) in p[..n * n].chunks_exact(n).enumerate() {
        let o = &mut out[i * out_stride..i * out_stride + d];
        let mut c = 0;
        while c + 4 * LANES <= d {
            weighted_sum::<FMA, { 4 * LANES }>(weights, &v[c..], stride, &mut o[c..]);
            c += 4 * LANES;
        }
        while c + LANES <= d {
            weighted_sum::<FMA, LANES>(weights, &v[c..], stride, &mut o[c..]);
            c += LANES;
        }
        for (c, o) in o.iter_mut().enumerate().skip(c) {
            *o = weights
                .iter()
                .enumerate()
                .fold(0.0, |s, (j, &a)| mul_add::<FMA>(a, v[j * stride + c], s));
        }
    }
}

/// Values in one vector register (AVX2), the unit of the attention loops.
const LANES: usize = 8;

/// `out[..W] = Σ_j weights[j] · v[j·stride..][..W]`, the `W` sums held in registers.
#[inline(always)]
fn weighted_sum<const FMA: bool, const W: usize>(
    weights: &[f32],
    v: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let mut sums = [0f32; W];
    for (j, &a) in weights.iter().enumerate() {
        let row: &[f32; W] = v[j * stride..j * stride + W]
            .try_into()
            .expect("a slice of W values");
        for (s, &x) in sums.iter_mut().zip(row) {
            *s = mul_add::<FMA>(a, x, *s);
        }
    }
    out[..W].copy_from_slice(&sums);
}

/// BERT's GELU, the exact (erf) form `x/2 · (1 + erf(x/√2))`, in place.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn gelu_erf(x: &mut [f32]) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    x.iter_mut()
        .for_each(|v| *v = 0.5 * *v * (1.0 + erf::<FMA>(*v * std::f32::consts::FRAC_1_SQRT_2)));
}

/// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`):
/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))`, with `tanh(u) = 1 − 2/(e^{2u} + 1)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn gelu_tanh(x: &mut [f32]) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    x.iter_mut().for_each(|v| {
        let u = SQRT_2_OVER_PI * (*v + 0.044_715 * *v * *v * *v);
        let tanh = 1.0 - 2.0 / (exp::<FMA>(2.0 * u) + 1.0);
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
    const FMA: bool = selected_target!().supports_feature_str("fma");
    x.iter_mut().for_each(|v| *v /= 1.0 + exp::<FMA>(-*v));
}

/// `e^x` for f32, branch-free so that loops over it vectorise. Relative error below 2e-7 from
/// -87.33 to 88 (tested against `f32::exp`); below -87.33 (f32's smallest normal) it returns
/// e^-87.33 ≈ 1.2e-38, and above 88 it returns e^88 ≈ 1.7e38 instead of growing to infinity.
/// Softmax passes `x ≤ 0` (after subtracting the maximum); GELU's tanh form and SiLU pass any
/// value (beyond ±88 their tanh and sigmoid are ±1 and 0 to f32 precision anyway).
///
/// Method: `e^x = 2^n · e^r` with `n = round(x·log2 e)` and `|r| ≤ ln2/2`, `e^r` by its Taylor
/// series to degree 7 (error term `0.347^8/8! ≈ 5e-9`), `2^n` built from the exponent bits.
/// With FMA, the reduction `x − n·ln2` is fused too.
/// `FMA`: whether the caller was compiled for a CPU with FMA (see `mul_add`).
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split in two so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to an integer in the low mantissa bits, with no branch and no
    // float→int conversion.
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = mul_add::<FMA>(-n, LN2_LO, mul_add::<FMA>(-n, LN2_HI, x));
    // Estrin's scheme: pairs of terms, then pairs of pairs. The same polynomial as Horner's
    // seven dependent multiply-adds, in a chain of three, which is what bounds a loop of
    // GELU or softmax (every element is independent, so latency, not throughput, sets the
    // pace).
    let r2 = r * r;
    let r4 = r2 * r2;
    let pair = |c0: f32, c1: f32| mul_add::<FMA>(c1, r, c0);
    let low = mul_add::<FMA>(pair(1.0 / 2.0, 1.0 / 6.0), r2, pair(1.0, 1.0));
    let high = mul_add::<FMA>(
        pair(1.0 / 720.0, 1.0 / 5040.0),
        r2,
        pair(1.0 / 24.0, 1.0 / 120.0),
    );
    let p = mul_add::<FMA>(high, r4, low);
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    p * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// `erf(x)` for f32, branch-free, absolute error below 4e-7 (tested against `libm::erff`).
/// A rational function fitted for this kernel (`scripts/fit-erf.py`, which prints these
/// coefficients and the error): `erf(x) ≈ x·P(x²)/Q(x²)` on `[-4, 4]`, P of degree 6 and Q of
/// degree 4, each by Horner's rule; beyond ±4, erf is ±1 to f32 precision. Against
/// Abramowitz & Stegun's formula 7.1.26 with an `exp`, GELU's AVX-512 loop went from 45 to 28
/// instructions per 16 values (one of them a division, in both), and took 0.73x the time
/// (`make bench-kernels`: 38.8 against 53.0 µs).
#[inline(always)]
pub fn erf<const FMA: bool>(x: f32) -> f32 {
    const P: [f32; 7] = [
        1.128_378_6,
        0.214_004_32,
        0.052_442_66,
        0.004_295_664_4,
        0.000_155_594_6,
        -1.990_499_4e-6,
        1.921_531_6e-8,
    ];
    const Q: [f32; 5] = [
        1.0,
        0.522_984_1,
        0.120_825_276,
        0.015_556_763,
        0.001_098_642_9,
    ];
    let u = x.clamp(-4.0, 4.0);
    let s = u * u;
    let p = P[..6]
        .iter()
        .rev()
        .fold(P[6], |p, &c| mul_add::<FMA>(p, s, c));
    let q = Q[..4]
        .iter()
        .rev()
        .fold(Q[4], |q, &c| mul_add::<FMA>(q, s, c));
    // The fit goes past 1 by up to 2e-7 (1.0000002 near ±3.74, in the script's model of the
    // f32 evaluation).
    (u * p / q).clamp(-1.0, 1.0)
}

/// `a·b + c`. With `FMA` (the multiversioned caller's clone was compiled for a CPU that has
/// it), one fused instruction: the polynomials of `exp` and `erf` are chains of dependent
/// multiply-adds, and fusing each pair shortens the chain (gelu_erf took 0.8x the time,
/// `make bench-kernels`). Without it `f32::mul_add` would be a slow library call, so a product
/// and a sum.
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    match FMA {
        true => a.mul_add(b, c),
        false => a * b + c,
    }
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::HeadRows;
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_mul_ps,
        _mm256_permute2f128_ps, _mm256_set1_ps, _mm256_setzero_ps,
    };

    /// `attention_scores` for `d` a multiple of 8. Eight keys at a time, against every query
    /// row: eight dot products accumulate in eight registers, one FMA per vector of `d`, then
    /// three rounds of pairwise adds leave the eight sums in one register. Past the last key,
    /// the block repeats it and drops those lanes: no branch inside.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores(head: HeadRows<'_>, scale: f32, scores: &mut [f32]) {
        let HeadRows {
            q, k, stride, n, d, ..
        } = head;
        let scale = _mm256_set1_ps(scale);
        let scores = &mut scores[..n * n];
        for first in (0..n).step_by(8) {
            // Where each lane's key starts (closures and `array::from_fn` here were not
            // inlined into this AVX2 function: a third of its time, perf).
            let mut starts = [0usize; 8];
            for (lane, start) in starts.iter_mut().enumerate() {
                *start = (first + lane).min(n - 1) * stride;
            }
            let keys = 8.min(n - first);
            for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                let q_i = &q[i * stride..i * stride + d];
                let mut sums = [_mm256_setzero_ps(); 8];
                for c in (0..d).step_by(8) {
                    let x = load(&q_i[c..]);
                    for (sum, &start) in sums.iter_mut().zip(&starts) {
                        *sum = _mm256_fmadd_ps(x, load(&k[start + c..]), *sum);
                    }
                }
                // [s0 s1 s2 s3 | s4 s5 s6 s7] halves, each lane a partial sum of one key.
                let pairs = [
                    _mm256_hadd_ps(sums[0], sums[1]),
                    _mm256_hadd_ps(sums[2], sums[3]),
                    _mm256_hadd_ps(sums[4], sums[5]),
                    _mm256_hadd_ps(sums[6], sums[7]),
                ];
                let low = _mm256_hadd_ps(pairs[0], pairs[1]); // keys 0-3 in each half
                let high = _mm256_hadd_ps(pairs[2], pairs[3]); // keys 4-7 in each half
                let total = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(low, high),
                    _mm256_permute2f128_ps::<0x31>(low, high),
                );
                let lanes: [f32; 8] = bytemuck::cast(_mm256_mul_ps(total, scale));
                row[first..first + keys].copy_from_slice(&lanes[..keys]);
            }
        }
    }

    #[inline(always)]
    fn load(values: &[f32]) -> __m256 {
        let mut lanes = [0f32; 8];
        lanes.copy_from_slice(&values[..8]);
        bytemuck::cast(lanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short-sentence attention kernels against the definition (in f64), on strided
    /// inputs as the packed Q, K, V buffer has them, for head sizes of 32, 64 and 48 (the
    /// AVX2 scores, where the CPU has it) and 20 (portable scores; values with a tail).
    #[test]
    fn attention_kernels_equal_the_definition() {
        for d in [32, 64, 20, 48] {
            for n in [1, 2, 7, 10, 33, 64] {
                let stride = 3 * d + 5; // rows further apart than a head, as in the pass
                let value = |i: usize| ((i * 7919 % 613) as f32 - 306.0) / 307.0;
                let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                    (0..n * stride).map(value).collect(),
                    (0..n * stride).map(|i| value(i + 1)).collect(),
                    (0..n * stride).map(|i| value(i + 2)).collect(),
                );
                let scale = 1.0 / (d as f32).sqrt();
                let mut kt = vec![f32::NAN; d * n];
                let mut scores = vec![f32::NAN; n * n];
                let head = HeadRows {
                    q: &q,
                    k: &k,
                    v: &v,
                    stride,
                    n,
                    d,
                };
                attention_scores(head, scale, &mut kt, &mut scores);
                let mut portable = vec![f32::NAN; n * n];
                portable_scores(head, scale, &mut kt, &mut portable);
                for i in 0..n {
                    for j in 0..n {
                        let dot: f64 = (0..d)
                            .map(|c| q[i * stride + c] as f64 * k[j * stride + c] as f64)
                            .sum();
                        let want = dot * scale as f64;
                        // Both routes: this CPU's (the AVX2 kernel, where it has AVX2 and FMA
                        // and d is a multiple of 8) and the portable loops.
                        for got in [scores[i * n + j], portable[i * n + j]] {
                            let got = got as f64;
                            assert!((got - want).abs() < 1e-5, "d {d} n {n} ({i}, {j}): {got}");
                        }
                    }
                }
                let out_stride = d + 3;
                let mut out = vec![f32::NAN; n * out_stride];
                attention_values(head, &scores, &mut out, out_stride);
                for i in 0..n {
                    for c in 0..d {
                        let want: f64 = (0..n)
                            .map(|j| scores[i * n + j] as f64 * v[j * stride + c] as f64)
                            .sum();
                        let got = out[i * out_stride + c] as f64;
                        assert!((got - want).abs() < 1e-4, "d {d} n {n} ({i}, {c})");
                    }
                }
            }
        }
    }

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
        // Two rows, the second shifted: each its own softmax, the same values.
        let mut r = [1.0, 2.0, 3.0, 11.0, 12.0, 13.0];
        softmax(&mut r, 3);
        let expected = [1.0f32.exp(), 2.0f32.exp(), 3.0f32.exp()];
        let sum: f32 = expected.iter().sum();
        for row in r.chunks(3) {
            assert!(
                (row.iter().sum::<f32>() - 1.0).abs() < 1e-6 && row[2] > row[1] && row[1] > row[0]
            );
            for (got, want) in row.iter().zip(expected) {
                assert!((got - want / sum).abs() < 1e-7);
            }
        }
        let mut x = [1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, Some(&[1.0; 4]), &[1.0; 4], &[0.0; 4], 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    /// Every 1/1000 from -100 to 88, against the standard library's correctly rounded `exp`;
    /// fused and unfused.
    #[test]
    fn exp_is_accurate_over_the_range() {
        exp_is_accurate::<false>();
        exp_is_accurate::<true>();
    }

    fn exp_is_accurate<const FMA: bool>() {
        let exp = exp::<FMA>;
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
        assert!(worst < 2e-7, "worst relative error {worst} (FMA: {FMA})");
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.33));
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Every 1/10000 from -6 to 6 (erf is ±1 to f32 precision beyond), against libm's erff;
    /// fused and unfused.
    #[test]
    fn erf_is_accurate_over_the_range() {
        erf_is_accurate::<false>();
        erf_is_accurate::<true>();
    }

    fn erf_is_accurate<const FMA: bool>() {
        let erf = erf::<FMA>;
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 4e-7, "worst absolute error {worst} (FMA: {FMA})");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
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
