//! Products in bf16 on Intel's AMX tiles (`model.precision = "bf16"`): the inputs of a linear
//! layer and its weights rounded to bfloat16 (to nearest, as PyTorch rounds), their products
//! summed in f32 by `TDPBF16PS`, the bias added in f32 after. Every other operation of the
//! forward pass (attention, softmax, layer norm, GELU, pooling) stays in f32.
//!
//! Why: one `TDPBF16PS` is 16 × 16 × 32 multiply-adds, where an AVX-512 FMA is 16. Measured
//! end to end on the development machine's Xeon (one worker, `threads = 1`): forward passes
//! 2.6-3.2x as fast as f32's at 8-128 sentences, 1.7x for one; one-sentence `/embed` at 3,549
//! req/s on 32 connections against f32's 1,128 (`bench/concurrency.py`).
//!
//! What it costs in fidelity (`bench/precision.py`, all-MiniLM-L6-v2): min cosine 0.99997 to
//! sentence-transformers on the reference set and its clusterings identical, but four of six
//! clusterings of 3,000 sentences, at thresholds that sit between two close similarities,
//! move. So it is opt-in, never the default.
//!
//! A row's outputs depend only on that row and the weights, summed in the same order
//! whatever the rows beside it (zero rows pad a block of 16): a sentence's vector does not
//! depend on the requests that share its pass, here as in f32.
//!
//! Linux lends a process AMX's tile registers only once asked (`arch_prctl`, Linux 5.16 and
//! later); `enable` asks, in the master before fork, and the workers inherit the permission.
//! Each thread then loads the tile shapes once (`configure`) before its first product.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::cell::Cell;
use std::sync::OnceLock;

use super::aligned::Aligned;

/// Inputs per tile step: a row of an input tile is 32 bf16 values (64 bytes).
const STEP: usize = 32;
/// Outputs per panel: two tiles of 16 columns side by side. `product` starts on one.
pub(super) const PANEL: usize = 32;
/// Rows of a tile.
const TILE_ROWS: usize = 16;

/// Whether this process may run AMX's bf16 tiles: `Err` says why not (the CPU lacks them, or
/// the kernel does not lend them). Asked once; the answer is kept, and inherited by fork.
pub fn enable() -> Result<(), String> {
    static ENABLED: OnceLock<Result<(), String>> = OnceLock::new();
    ENABLED.get_or_init(request_tiles).clone()
}

#[cfg(target_arch = "x86_64")]
fn request_tiles() -> Result<(), String> {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (Intel SDM, vol. 2A, CPUID).
    // Leaf 0 says how many leaves there are.
    let edx = match std::arch::x86_64::__cpuid(0).eax >= 7 {
        true => std::arch::x86_64::__cpuid_count(7, 0).edx,
        false => 0,
    };
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return Err(
            "this CPU has no AMX-BF16 tiles (Intel Xeon of the 4th generation, \
                    Sapphire Rapids, or later)"
                .to_string(),
        );
    }
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA (Linux's arch/x86/include/uapi/asm/prctl.h).
    const ARCH_REQ_XCOMP_PERM: nix::libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: nix::libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel for a permission; it
    // touches no memory of ours.
    let asked = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    match asked {
        0 => Ok(()),
        _ => Err(format!(
            "the kernel refused this process AMX's tile registers ({}; Linux 5.16 or later lends them)",
            std::io::Error::last_os_error()
        )),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn request_tiles() -> Result<(), String> {
    Err("AMX tiles are an x86-64 feature".to_string())
}

/// `x` rounded to the nearest bfloat16 (ties to even), as PyTorch's `.to(torch.bfloat16)`:
/// the upper half of the f32 after rounding. A NaN stays a NaN or becomes an infinity, never
/// a finite value.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// `to_bf16` of each value, vectorised with the widest instructions the CPU has.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn round(values: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = to_bf16(v);
    }
}

/// Inputs rounded up to whole tile steps: the packed weights and the rounded rows are
/// zero-padded to it.
pub fn padded_inputs(inputs: usize) -> usize {
    inputs.div_ceil(STEP) * STEP
}

/// PyTorch's `[out, in]` weights (`weight(j, i)`) packed for the tiles: panel by panel of 32
/// outputs, each as two halves of 16; within a half, for each pair of inputs, the 16 outputs'
/// two values side by side (the "VNNI" layout a B tile of `TDPBF16PS` reads). Outputs and
/// inputs past the matrix's are zeros. `Err` holds a finite weight that rounds to an infinity
/// (bf16 has f32's exponents: only the last step below f32's largest does).
pub fn pack(
    weight: impl Fn(usize, usize) -> f32,
    inputs: usize,
    outputs: usize,
) -> Result<Aligned<u16>, f32> {
    let k = padded_inputs(inputs);
    let panels = outputs.div_ceil(PANEL);
    let mut packed = Aligned::new(panels * PANEL * k);
    for (at, value) in packed.iter_mut().enumerate() {
        let (half_at, within) = (at / (TILE_ROWS * k), at % (TILE_ROWS * k));
        let (pair, column, side) = (within / 32, within % 32 / 2, within % 2);
        let (j, i) = (half_at * TILE_ROWS + column, 2 * pair + side);
        if j < outputs && i < inputs {
            let w = weight(j, i);
            *value = to_bf16(w);
            if w.is_finite() && !from_bf16(*value).is_finite() {
                return Err(w);
            }
        }
    }
    Ok(packed)
}

/// The f32 a bf16 value stands for (exactly).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Rows of a product's input rounded to bf16, padded with zeros to whole steps of inputs and
/// whole tiles of rows.
pub struct Rows {
    values: Vec<u16>,
    /// Values a row (the padded inputs).
    stride: usize,
    rows: usize,
}

thread_local! {
    /// The last `Rows`' memory, kept for the next product rather than allocated afresh.
    static KEPT: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    /// Whether this thread has loaded the tile shapes.
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

impl Rows {
    /// `x[rows, inputs]` rounded.
    pub fn new(x: &[f32], rows: usize, inputs: usize) -> Rows {
        let stride = padded_inputs(inputs);
        let len = rows.div_ceil(TILE_ROWS) * TILE_ROWS * stride;
        // Every value is written below: the kept memory is not cleared first.
        let mut values = KEPT.take();
        values.resize(len, 0);
        let mut source = x[..rows * inputs].chunks_exact(inputs.max(1));
        for out in values.chunks_exact_mut(stride) {
            let padding = match source.next() {
                Some(row) => {
                    round(row, &mut out[..inputs]);
                    &mut out[inputs..]
                }
                None => out,
            };
            padding.fill(0);
        }
        Rows {
            values,
            stride,
            rows,
        }
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        KEPT.set(std::mem::take(&mut self.values));
    }
}

/// 32 × 32 f32 outputs of one block: four tiles.
#[repr(C, align(64))]
struct Block([[f32; PANEL]; 2 * TILE_ROWS]);

/// `dst[r, j - from] = Σ_i rows[r, i] · W[j, i] + bias[j]` for the outputs `from..to` (`from`
/// on a panel boundary), rows `stride` apart in `dst`. `packed` is `pack`'s layout of
/// `outputs` outputs. The caller has had `enable` succeed.
#[allow(clippy::too_many_arguments)]
pub fn product(
    rows: &Rows,
    packed: &[u16],
    bias: &[f32],
    outputs: usize,
    from: usize,
    to: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    let k = rows.stride;
    let steps = k / STEP;
    // The kernels' loop runs at least one step (a count of 0 would wrap around).
    assert!(steps > 0, "a product over no inputs");
    assert!(
        from.is_multiple_of(PANEL)
            && to <= outputs
            && packed.len() >= outputs.div_ceil(PANEL) * PANEL * k
    );
    assert!(rows.rows == 0 || dst.len() >= (rows.rows - 1) * dst_stride + (to - from));
    configure();
    let mut block = Block([[0.0; PANEL]; 2 * TILE_ROWS]);
    for first in (from..to).step_by(PANEL) {
        let width = PANEL.min(to - first);
        let panel = &packed[first * k..(first + PANEL) * k];
        for r0 in (0..rows.rows).step_by(2 * TILE_ROWS) {
            let height = (2 * TILE_ROWS).min(rows.rows - r0);
            let a = &rows.values[r0 * k..];
            // SAFETY: the tiles are configured on this thread (`configure`); `a` holds
            // `height` rows rounded up to whole tiles of `k` values (`Rows::new`), `panel` two
            // halves of `k / 2` pairs of 16 outputs (`pack`), `block` 32 rows of 32 outputs:
            // the kernels read and write within them.
            unsafe {
                match height > TILE_ROWS {
                    true => tiles_32(a.as_ptr(), k, panel.as_ptr(), steps, &mut block),
                    false => tiles_16(a.as_ptr(), k, panel.as_ptr(), steps, &mut block),
                }
            }
            for (r, sums) in block.0[..height].iter().enumerate() {
                let out = &mut dst[(r0 + r) * dst_stride + first - from..][..width];
                for ((o, s), b) in out.iter_mut().zip(sums).zip(&bias[first..]) {
                    *o = s + b;
                }
            }
        }
    }
}

/// The tile shapes, loaded once per thread: tiles 0-3 hold 16 × 16 f32 sums, 4-5 16 rows of
/// 32 bf16 inputs, 6-7 16 pairs of inputs of 16 outputs: every tile 16 rows of 64 bytes.
fn configure() {
    if CONFIGURED.get() {
        return;
    }
    // Without the kernel's permission the first tile instruction kills the process (SIGILL).
    if let Err(why) = enable() {
        panic!("bf16 products without AMX: {why}");
    }
    // The 64-byte LDTILECFG operand (Intel SDM, vol. 1, "Intel AMX"): palette 1, then each
    // tile's bytes a row and rows.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_a_row: [u16; 16],
        rows: [u8; 16],
    }
    let mut config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_a_row: [0; 16],
        rows: [0; 16],
    };
    for tile in 0..8 {
        config.bytes_a_row[tile] = 64;
        config.rows[tile] = TILE_ROWS as u8;
    }
    // SAFETY: `enable` succeeded (the caller's duty), so the kernel lends this thread the
    // tiles; `config` is a valid palette-1 configuration, 64 bytes, aligned.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &config as *const Config, options(nostack, readonly));
    }
    CONFIGURED.set(true);
}

/// 32 rows × 32 outputs over `steps` steps of 32 inputs: `a` is 32 rows of `k` bf16 values,
/// `b` a packed panel (two halves of `steps · 16` pairs of 16 outputs).
///
/// # Safety
/// Tiles configured on this thread; `a` readable for 32 rows of `k`, `b` for `2 · steps · 512`
/// values.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_32(a: *const u16, k: usize, b: *const u16, steps: usize, out: &mut Block) {
    let half = steps * 512;
    let c = out.0.as_mut_ptr() as *mut f32;
    // SAFETY: the caller's; every load stays within `a` (rows 0-31, 64 bytes a step) and `b`
    // (1,024 bytes a step in each half), the stores within `out`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {a_stride}*1]",
            "tileloadd tmm6, [{b0} + {b_stride}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {b_stride}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a16} + {a_stride}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {a16}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c} + {c_stride}*1], tmm0",
            "tilestored [{c_right} + {c_stride}*1], tmm1",
            "tilestored [{c_low} + {c_stride}*1], tmm2",
            "tilestored [{c_low_right} + {c_stride}*1], tmm3",
            a = inout(reg) a => _,
            a16 = inout(reg) a.add(TILE_ROWS * k) => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(half) => _,
            steps = inout(reg) steps => _,
            a_stride = in(reg) 2 * k,
            b_stride = in(reg) 64usize,
            c = in(reg) c,
            c_right = in(reg) c.add(TILE_ROWS),
            c_low = in(reg) c.add(TILE_ROWS * PANEL),
            c_low_right = in(reg) c.add(TILE_ROWS * PANEL + TILE_ROWS),
            c_stride = in(reg) PANEL * 4,
            options(nostack),
        );
    }
}

/// `tiles_32` for 16 rows (the first 16 of `out`): a block of at most 16 rows, such as a
/// one-sentence request's, runs half the multiply-adds. Measured side by side with `tiles_32`
/// alone (16 zero rows computed): one sentence's bf16 pass 1.32-1.34 against 1.57-1.77 ms in
/// three of four rounds, batches level.
///
/// # Safety
/// As `tiles_32`, with `a` readable for 16 rows.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_16(a: *const u16, k: usize, b: *const u16, steps: usize, out: &mut Block) {
    let half = steps * 512;
    let c = out.0.as_mut_ptr() as *mut f32;
    // SAFETY: as in `tiles_32`, for rows 0-15.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "2:",
            "tileloadd tmm4, [{a} + {a_stride}*1]",
            "tileloadd tmm6, [{b0} + {b_stride}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {b_stride}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c} + {c_stride}*1], tmm0",
            "tilestored [{c_right} + {c_stride}*1], tmm1",
            a = inout(reg) a => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(half) => _,
            steps = inout(reg) steps => _,
            a_stride = in(reg) 2 * k,
            b_stride = in(reg) 64usize,
            c = in(reg) c,
            c_right = in(reg) c.add(TILE_ROWS),
            c_stride = in(reg) PANEL * 4,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_32(_: *const u16, _: usize, _: *const u16, _: usize, _: &mut Block) {
    unreachable!("`enable` fails off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_16(_: *const u16, _: usize, _: *const u16, _: usize, _: &mut Block) {
    unreachable!("`enable` fails off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one, up.
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "beyond bf16's largest: infinity");
    }

    /// What `product` must give: the bf16-rounded inputs and weights multiplied and summed
    /// in f64, the bias added.
    fn expected(x: &[f32], w: &[f32], bias: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let bf = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let dot: f64 = (0..k).map(|i| bf(x[r * k + i]) * bf(w[j * k + i])).sum();
                out[r * n + j] = dot + bias[j] as f64;
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_are_the_rounded_inputs_summed_in_f32() {
        if let Err(why) = enable() {
            eprintln!("skipped: {why}");
            return;
        }
        // Shapes that are not whole tiles: 37 inputs (two steps, the second mostly padding),
        // 45 outputs (a narrow last panel), 1, 16, 17 and 40 rows.
        for (rows, k, n) in [(1, 37, 45), (16, 64, 32), (17, 384, 96), (40, 37, 45)] {
            let (x, w, bias) = (values(rows * k, 1), values(n * k, 2), values(n, 3));
            let packed = pack(|j, i| w[j * k + i], k, n).unwrap();
            let mut out = vec![f32::NAN; rows * n];
            product(
                &Rows::new(&x, rows, k),
                &packed,
                &bias,
                n,
                0,
                n,
                &mut out,
                n,
            );
            for (at, (got, want)) in out
                .iter()
                .zip(expected(&x, &w, &bias, rows, k, n))
                .enumerate()
            {
                // f32 sums of k exact products: within a few ulps of the largest partial sum.
                let tolerance = 1e-6 * (k as f64);
                assert!(
                    (*got as f64 - want).abs() <= tolerance,
                    "{rows}x{k}x{n} at {at}: {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_among_others() {
        if let Err(why) = enable() {
            eprintln!("skipped: {why}");
            return;
        }
        let (k, n, rows) = (384, 64, 70);
        let (x, w, bias) = (values(rows * k, 4), values(n * k, 5), values(n, 6));
        let packed = pack(|j, i| w[j * k + i], k, n).unwrap();
        let mut all = vec![0.0; rows * n];
        product(
            &Rows::new(&x, rows, k),
            &packed,
            &bias,
            n,
            0,
            n,
            &mut all,
            n,
        );
        for r in [0, 15, 16, 31, 32, 69] {
            let mut alone = vec![0.0; n];
            product(
                &Rows::new(&x[r * k..], 1, k),
                &packed,
                &bias,
                n,
                0,
                n,
                &mut alone,
                n,
            );
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                all[r * n..(r + 1) * n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {r}"
            );
        }
        // A share of the outputs (as a thread computes it) gives the same bits too.
        let mut share = vec![0.0; rows * 32];
        product(
            &Rows::new(&x, rows, k),
            &packed,
            &bias,
            n,
            32,
            64,
            &mut share,
            32,
        );
        for r in 0..rows {
            assert_eq!(share[r * 32..(r + 1) * 32], all[r * n + 32..(r + 1) * n]);
        }
    }
}
