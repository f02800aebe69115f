"""Forecast metrics on a split, against the baselines a forecaster must beat.

A forecast issued after step t covers t+1 .. t+H. For a split [s0, s1) we score every t with
s0 - 1 <= t and t + H < s1, so every scored value lies inside the split and the input history
(earlier rows, which a live sensor would have seen) may come from before it.
- regression: MAE and RMSE over all t and all H offsets; baselines persistence (the last value)
  and seasonal naive (the value one period before the forecast time; the period among the
  candidates that scores best on validation);
- classification: accuracy and macro-F1 of the next step's class; baselines the train split's
  majority class and "same as today" (the current class).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def horizon_targets(y: np.ndarray, horizon: int) -> np.ndarray:
    """[N, H]: row t holds y[t+1 .. t+H] (NaN past the end)."""
    n = len(y)
    out = np.full((n, horizon), np.nan)
    for k in range(horizon):
        out[: n - k - 1, k] = y[k + 1:]
    return out


def scored_steps(split: tuple[int, int], horizon: int) -> np.ndarray:
    s0, s1 = split
    return np.arange(max(s0 - 1, 0), s1 - horizon)


def persistence(y: np.ndarray, t: np.ndarray, horizon: int) -> np.ndarray:
    return np.repeat(y[t][:, None], horizon, axis=1)


def seasonal_naive(y: np.ndarray, t: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """y at the forecast time minus whole periods, the latest such value already observed at t."""
    k = np.arange(horizon)[None, :]
    lag = period * ((k + 1 + period - 1) // period)       # the smallest multiple of period >= k+1
    idx = t[:, None] + k + 1 - lag
    return y[np.clip(idx, 0, None)]


def regression_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = pred - truth
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def macro_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Macro-F1 over the classes that occur in the truth or the prediction."""
    scores = []
    for c in np.union1d(pred, truth):
        tp = np.sum((pred == c) & (truth == c))
        fp, fn = np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def classification_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(np.mean(pred == truth)), "macro_f1": macro_f1(pred, truth)}


def pick_period(y: np.ndarray, val: tuple[int, int], horizon: int, candidates: list[int]) -> int | None:
    """The seasonal period that scores best (MAE) on validation; None without candidates that fit."""
    t = scored_steps(val, horizon)
    fits = [p for p in candidates if len(t) and t[0] + 1 - p >= 0]  # k = 0 reaches back furthest
    if not fits:
        return None
    truth = horizon_targets(y, horizon)[t]
    return min(fits, key=lambda p: regression_scores(seasonal_naive(y, t, horizon, p), truth)["mae"])


def score_split(model_out: np.ndarray, series, split: tuple[int, int], horizon: int,
                period: int | None) -> list[dict[str, Any]]:
    """Rows [{"name", metrics...}] for the model and each baseline on one split."""
    y = series.target
    t = scored_steps(split, horizon)
    if series.head == "regression":
        truth = horizon_targets(y.astype(np.float64), horizon)[t]
        rows = [{"name": "model", **regression_scores(model_out[t], truth)},
                {"name": "persistence", **regression_scores(persistence(y, t, horizon), truth)}]
        if period is not None:
            rows.append({"name": f"seasonal naive ({period} steps)",
                         **regression_scores(seasonal_naive(y, t, horizon, period), truth)})
        return rows
    b0 = series.bounds[0]
    truth = y[t + 1]
    majority = int(np.bincount(y[:b0]).argmax())
    return [{"name": "model", **classification_scores(model_out[t].argmax(-1), truth)},
            {"name": f"majority class ({series.class_names[majority]})",
             **classification_scores(np.full_like(truth, majority), truth)},
            {"name": "same as today", **classification_scores(y[t], truth)}]


def beats_baselines(rows: list[dict[str, Any]]) -> bool:
    """The model is better than every baseline on every metric (lower errors, higher scores)."""
    model, baselines = rows[0], rows[1:]
    lower = ("mae", "rmse")
    keys = [k for k in model if k != "name"]
    return all((model[k] < b[k]) if k in lower else (model[k] > b[k]) for b in baselines for k in keys)


def format_table(rows: list[dict[str, Any]], units: str = "") -> str:
    keys = [k for k in rows[0] if k != "name"]
    width = max(len(r["name"]) for r in rows)
    head = f"{'':{width}}  " + "  ".join(f"{k + (f' ({units})' if units and k in ('mae', 'rmse') else ''):>12}"
                                          for k in keys)
    lines = [head] + [f"{r['name']:{width}}  " + "  ".join(f"{r[k]:12.4f}" for k in keys) for r in rows]
    return "\n".join(lines)
