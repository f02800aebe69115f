"""How close two float outputs must be: |got - ref| <= atol + rtol * |ref|, elementwise (numpy's allclose form).

Nothing here knows about logits or recurrent models: any float output (class scores,
forecasts, states) is compared the same way; `argmax_check` adds the classifier rule.

Why rtol 1e-3 and atol 1e-4 (the defaults):
  * Two correct float32 runtimes differ by rounding only, and rounding error is relative
    to the size of what is summed. A dot product of length n carries ~sqrt(n)*u of its
    terms' magnitude (u = 2**-24 ~ 6e-8; n ~ 2000 for a 2x1024 LSTM: ~3e-6), and a
    recurrent model feeds that error back through every step (the sigmoid/tanh gates damp
    it; the LSTM's cell state sums it). Measured on random models up to 2x1024 with
    outputs up to ~130 and on the trained char-lstm preset: elements away from zero
    differ by 1e-5 to 7e-4 relative. rtol 1e-3 asks for 10 of float32's
    24 mantissa bits to agree, with room for the growth above; a fixed absolute limit
    cannot, as it fails larger outputs for rounding alone.
  * An element near zero is often a cancellation of large terms: its error follows the
    terms, not its own size, so a relative bound alone would fail it. atol 1e-4 covers that
    for outputs up to the tens (a trained char LM's logits); it is also the absolute limit
    this gate had before, so nothing that passed it then fails now.
  * What it still catches: an export bug (wrong gate order, a dropped bias, a transposed
    weight) moves outputs by O(1); one output-layer weight moved by 1e-3 fails it
    (tests/export). One recurrent weight moved by 1e-3 moves outputs by ~1e-4 and may pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ATOL = 1e-4
RTOL = 1e-3


@dataclass(frozen=True)
class Tolerance:
    atol: float = ATOL
    rtol: float = RTOL

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ValueError(f"tolerances must be >= 0, got atol={self.atol} rtol={self.rtol}")

    def describe(self) -> str:
        return f"|d| <= {self.atol:g} + {self.rtol:g}*|ref|"

    def as_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "rule": "|got - ref| <= atol + rtol * |ref|, elementwise"}


DEFAULT_TOLERANCE = Tolerance()


def compare_arrays(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Elementwise check of got against ref. The worst element is the one nearest its limit.

    max_rel_diff is max |d|/|ref| over elements with |ref| > atol (below that the limit is
    absolute and a ratio says nothing). ratio = |d| / (atol + rtol*|ref|) at the worst
    element: <= 1 passes.
    """
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {got.shape}")
    if ref.size == 0:
        return {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_ref": None, "worst_diff": 0.0, "ratio": 0.0,
                "pass": True}
    r = ref.astype(np.float64)
    d = np.abs(got.astype(np.float64) - r)
    if not np.all(np.isfinite(d)):
        raise ValueError("non-finite difference (NaN or inf in an output)")
    mag = np.abs(r)
    ratios = d / (tol.atol + tol.rtol * mag) if tol.atol or tol.rtol else np.where(d > 0, np.inf, 0.0)
    worst = int(np.argmax(ratios))
    rel = d[mag > tol.atol] / mag[mag > tol.atol]
    ratio = float(ratios.flat[worst])  # inf only with atol = rtol = 0; None keeps the JSON strict
    return {"max_abs_diff": float(d.max()), "max_rel_diff": float(rel.max()) if rel.size else 0.0,
            "worst_ref": float(r.flat[worst]), "worst_diff": float(d.flat[worst]),
            "ratio": ratio if np.isfinite(ratio) else None, "pass": bool(ratio <= 1.0)}


def argmax_check(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, int]:
    """Identical argmax over the last axis, except near ties: positions where the reference's
    scores of the two classes chosen differ by no more than the tolerance (rounding may break
    such a tie either way; they are counted, not failed)."""
    a_ref, a_got = ref.argmax(-1), got.argmax(-1)
    diff = a_ref != a_got
    if not diff.any():
        return {"argmax_mismatches": 0, "argmax_near_ties": 0}
    ref_at_ref = np.take_along_axis(ref, a_ref[..., None], -1)[..., 0].astype(np.float64)
    ref_at_got = np.take_along_axis(ref, a_got[..., None], -1)[..., 0].astype(np.float64)
    tie = diff & (np.abs(ref_at_ref - ref_at_got) <= tol.atol + tol.rtol * np.abs(ref_at_ref))
    return {"argmax_mismatches": int((diff & ~tie).sum()), "argmax_near_ties": int(tie.sum())}


def compare_outputs(names: list[str], ref: list[np.ndarray], got: list[np.ndarray], tol: Tolerance,
                    argmax_output: str | None = None) -> dict[str, Any]:
    """Every named output within tol; argmax_output (class scores), if given, also keeps its argmax."""
    per = {n: compare_arrays(r, g, tol) for n, r, g in zip(names, ref, got, strict=True)}
    worst_name = max(per, key=lambda n: float("inf") if per[n]["ratio"] is None else per[n]["ratio"])
    worst = per[worst_name]
    out: dict[str, Any] = {
        "outputs": per,
        "max_abs_diff": max(p["max_abs_diff"] for p in per.values()),
        "max_rel_diff": max(p["max_rel_diff"] for p in per.values()),
        "worst_output": worst_name, "worst_ref": worst["worst_ref"], "worst_diff": worst["worst_diff"],
        "ratio": worst["ratio"],
    }
    ok = all(p["pass"] for p in per.values())
    if argmax_output is not None:
        i = names.index(argmax_output)
        out.update(argmax_check(ref[i], got[i], tol))
        ok = ok and out["argmax_mismatches"] == 0
    out["pass"] = ok
    return out
