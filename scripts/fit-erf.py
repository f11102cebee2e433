#!/usr/bin/env python3
"""Fits the rational approximation of erf that workers/src/model/kernels.rs uses:

    erf(x) ~= x * P(x^2) / Q(x^2)   on [0, 4]  (P of degree 6, Q of degree 4, Q(0) = 1)

by linearised least squares (x*P - erf*Q = 0, each row divided by the previous Q) with
Lawson's weights, which move the fit toward the smallest largest error. Prints the
coefficients as f32, and the largest absolute error of the f32 evaluation (Horner with fused
multiply-adds, then a division), over every 1/500000 from 0 to 6, against scipy's erf.

    target/bench-venv/bin/python scripts/fit-erf.py
"""
import numpy as np
from scipy.special import erf

P_TERMS, Q_TERMS, LIMIT = 7, 5, 4.0


def fit():
    x = np.linspace(0, LIMIT, 20000)
    f, s = erf(x), x * x
    q_prev, weight = np.ones_like(x), np.ones_like(x)
    for _ in range(60):
        columns = [x * s**j for j in range(P_TERMS)] + [-f * s**j for j in range(1, Q_TERMS)]
        scale = np.sqrt(weight) / q_prev
        a = np.stack(columns, axis=1) * scale[:, None]
        c, *_ = np.linalg.lstsq(a, f * scale, rcond=None)
        p, q = c[:P_TERMS], np.concatenate([[1.0], c[P_TERMS:]])
        q_prev = np.polyval(q[::-1], s)
        error = x * np.polyval(p[::-1], s) / q_prev - f
        weight = np.maximum(weight * np.abs(error), 1e-300)
        weight *= len(x) / weight.sum()
    return p.astype(np.float32), q.astype(np.float32)


def fma(a, b, c):
    """f32 a*b + c rounded once (the product of two f32 is exact in f64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def erf32(x, p, q):
    u = np.clip(x, -LIMIT, LIMIT).astype(np.float32)
    s = u * u
    num, den = np.full_like(s, p[-1]), np.full_like(s, q[-1])
    for c in p[-2::-1]:
        num = fma(num, s, c)
    for c in q[-2::-1]:
        den = fma(den, s, c)
    return np.clip(u * num / den, -1, 1)


def main():
    p, q = fit()
    x = np.linspace(0, 6, 3_000_001).astype(np.float32)
    worst = np.abs(erf32(x, p, q).astype(np.float64) - erf(x.astype(np.float64))).max()
    print("P:", ", ".join(str(v) for v in p))
    print("Q:", ", ".join(str(v) for v in q))
    print(f"largest absolute error of the f32 evaluation on [0, 6]: {worst:.3g}")


if __name__ == "__main__":
    main()
