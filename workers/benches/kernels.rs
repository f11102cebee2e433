//! One micro-benchmark per kernel of the forward pass, at the shapes a `/cluster` request of
//! the 9 seed titles gives all-MiniLM-L6-v2 (69 tokens, hidden 384, intermediate 1536, 12
//! heads, ~8 tokens per sentence), so that a regression in one kernel shows on its own.
//!
//!     cargo bench -p forkserve-worker --bench kernels     # or: make bench-kernels
//!
//! Random weights: the subject is speed, not the model (accuracy is tests/reference.rs's job).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use forkserve_worker::model::kernels::{
    attention_scores, attention_values, gelu_erf, layer_norm, softmax, HeadRows,
};
use forkserve_worker::model::linear::Linear;
use std::hint::black_box;

const TOKENS: usize = 69;
const HIDDEN: usize = 384;
const INTERMEDIATE: usize = 1536;

/// Deterministic values in [-1, 1) (a small LCG), so every run times the same numbers.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear");
    // (name, inputs, outputs): the four products of one layer.
    for (name, inputs, outputs) in [
        ("qkv", HIDDEN, 3 * HIDDEN),
        ("attention_out", HIDDEN, HIDDEN),
        ("intermediate", HIDDEN, INTERMEDIATE),
        ("output", INTERMEDIATE, HIDDEN),
    ] {
        let layer = Linear::from_torch(
            &values(inputs * outputs, 1),
            values(outputs, 2),
            inputs,
            outputs,
        );
        let x = values(TOKENS * inputs, 3);
        let mut out = vec![0f32; TOKENS * outputs];
        group.throughput(Throughput::Elements((2 * TOKENS * inputs * outputs) as u64));
        group.bench_function(BenchmarkId::new(name, TOKENS), |b| {
            b.iter(|| layer.forward(black_box(&x), TOKENS, &mut out, 1))
        });
    }
    group.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("elementwise");
    let input = values(TOKENS * INTERMEDIATE, 4);
    let mut x = input.clone();
    group.throughput(Throughput::Elements(input.len() as u64));
    group.bench_function("gelu_erf", |b| {
        b.iter(|| {
            x.copy_from_slice(&input);
            gelu_erf(black_box(&mut x))
        })
    });

    let rows = values(TOKENS * HIDDEN, 5);
    let residual = values(TOKENS * HIDDEN, 6);
    let (gamma, beta) = (values(HIDDEN, 7), values(HIDDEN, 8));
    let mut x = rows.clone();
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("layer_norm_residual", |b| {
        b.iter(|| {
            x.copy_from_slice(&rows);
            for (row, res) in x.chunks_mut(HIDDEN).zip(residual.chunks(HIDDEN)) {
                layer_norm(black_box(row), Some(res), &gamma, &beta, 1e-12);
            }
        })
    });

    // Attention probabilities: 12 heads × 8 query rows of 8 keys per sentence, 9 sentences.
    let scores = values(9 * 12 * 8 * 8, 9);
    let mut s = scores.clone();
    group.throughput(Throughput::Elements(scores.len() as u64));
    group.bench_function("softmax_rows_of_8", |b| {
        b.iter(|| {
            s.copy_from_slice(&scores);
            s.chunks_mut(64)
                .for_each(|rows| softmax(black_box(rows), 8))
        })
    });
    group.finish();
}

/// A short sentence's attention, as the pass runs it: Q, K and V read in place from the packed
/// `[tokens, 3·hidden]` buffer, every head's scores then its output.
fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    const HEADS: usize = 12;
    let d = HIDDEN / HEADS;
    let stride = 3 * HIDDEN;
    for n in [8, 10, 24] {
        let qkv = values(n * stride, 10);
        let mut scores = vec![0f32; n * n];
        let mut kt = vec![0f32; n * d];
        let mut context = vec![0f32; n * HIDDEN];
        group.throughput(Throughput::Elements((HEADS * n * n) as u64));
        group.bench_function(BenchmarkId::new("scores_and_values", n), |b| {
            b.iter(|| {
                for head in 0..HEADS {
                    let at = head * d;
                    let scale = 1.0 / (d as f32).sqrt();
                    let rows = HeadRows {
                        q: &qkv[at..],
                        k: &qkv[HIDDEN + at..],
                        v: &qkv[2 * HIDDEN + at..],
                        stride,
                        n,
                        d,
                    };
                    attention_scores(rows, scale, &mut kt, &mut scores);
                    attention_values(rows, &scores, &mut context[at..], HIDDEN);
                }
                black_box(&context);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, linear, elementwise, attention);
criterion_main!(benches);
