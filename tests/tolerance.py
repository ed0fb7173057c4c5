"""Tolerances from float32 rounding of the compared quantity, so they hold on any CPU.

Bounds follow Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed., sec. 3.1): with the
float32 unit roundoff u = 2^-24, a sum of n terms (a dot product of length n) computed in float32 in
any order (blocked or pairwise, with or without FMA: any BLAS, XLA backend or instruction set) is
within gamma_n * sum|terms| of the exact sum, gamma_n = n u / (1 - n u). Two such implementations
differ by at most twice that. Correctly rounded operations (+ - * /, sqrt) err by u relative; libm,
Sleef (torch) and XLA's exp, log, cos, sin and pow by at most about 1 ulp.
"""
from __future__ import annotations

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff
EPS = float(np.finfo(np.float32).eps)  # 2u: the spacing of float32 numbers at 1


def gamma(n: int) -> float:
    """Relative error bound of an n-term float32 sum (Higham's gamma_n)."""
    return n * U / (1 - n * U)


def dot_bound(a: np.ndarray, b: np.ndarray, subscripts: str, extra_terms: int = 0) -> np.ndarray:
    """How far two float32 evaluations of ``einsum(subscripts, a, b)`` may differ, elementwise:
    2 gamma_n einsum(|a|, |b|), n the contracted length (+ ``extra_terms``, e.g. 1 for a bias)."""
    a64, b64 = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    inputs, out = subscripts.split("->")
    sa, sb = inputs.split(",")
    n = int(np.prod([a64.shape[sa.index(c)] for c in set(sa) & set(sb) if c not in out]))
    return 2 * gamma(n + extra_terms) * np.einsum(subscripts, a64, b64)


def assert_within(actual, desired, bound, what: str = "") -> None:
    """``|actual - desired| <= bound`` elementwise (``bound`` broadcasts); the message gives the worst
    element and its error as a multiple of the bound."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), actual.shape)
    err = np.abs(actual - desired)
    ok = err <= bound
    if not ok.all():
        ratio = err / np.where(bound > 0, bound, np.finfo(np.float64).tiny)
        i = np.unravel_index(np.argmax(ratio), ratio.shape)
        raise AssertionError(f"{what}: {np.size(ok) - ok.sum()} of {np.size(ok)} elements outside the float32 "
                             f"rounding bound; worst at {tuple(map(int, i))}: {actual[i]!r} vs {desired[i]!r}, "
                             f"error {err[i]:.3g} = {ratio[i]:.3g} x the bound {bound[i]:.3g}")
