"""A forecaster's variant against its fp32 model on the forecaster's own test split.

The split is rebuilt from the checkpoint's train config exactly as training built it
(load_series: same data, target, features, time column and head; the same 70/15/15 bounds),
both models run over the whole series at batch 1 from the zero state (as training scores it),
and the test rows are scored by the trainer's own score_split.
  regression      acceptance: (MAE_variant - MAE_fp32) / MAE_fp32 <= max_mae_change (1% by
                  default): the error in raw units is what a forecaster's user sees. A variant
                  whose forecasts are better on test (negative change) is accepted, and the
                  change is reported with its sign.
  classification  acceptance: top-1 agreement of the next-step class on the test rows, as for
                  char models (min_agreement).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from rnnserve.contract import ModelMeta
from rnnserve.train.forecast_data import Series, load_series
from rnnserve.train.forecast_eval import score_split, scored_steps

DEFAULT_MAX_MAE_CHANGE = 0.01


def value_pair(a: float, b: float, min_digits: int = 4, max_digits: int = 12) -> tuple[str, str]:
    """a and b with the same significant digits, enough that they read equal only if they are."""
    for digits in range(min_digits, max_digits + 1):
        x, y = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if (x == y) == (a == b):
            break
    return x, y


def load_test_series(train_config: Mapping[str, Any]) -> Series:
    """The series training used (its split comes with it), from the checkpoint's train config."""
    return load_series(train_config["data"], train_config.get("target"), train_config.get("features"),
                       train_config.get("time_column"), train_config.get("head"))


def run_series(sess: ort.InferenceSession, meta: ModelMeta, series: Series) -> np.ndarray:
    """The ONNX model over the whole series (batch 1, zero state): [N, H] or [N, C], float64."""
    spec = meta.spec
    feeds = {spec.inputs[0].name: series.features[None].astype(np.float32)}
    feeds.update({s.input: np.zeros(s.concrete_shape(1), s.dtype) for s in spec.states})
    return sess.run([spec.outputs[0].name], feeds)[0][0].astype(np.float64)


def compare_forecast(ref: ort.InferenceSession, got: ort.InferenceSession, meta: ModelMeta,
                     series: Series) -> dict[str, Any]:
    """Test-split facts for the report: both MAEs and the relative change, or the class agreement."""
    a, b = run_series(ref, meta, series), run_series(got, meta, series)
    split = series.split("test")
    horizon = a.shape[1] if series.head == "regression" else 1
    t = scored_steps(split, horizon)
    facts: dict[str, Any] = {"eval_data": f"test split of {series.target_name}: rows {split[0]}..{split[1]} "
                                          f"({len(t)} scored steps)",
                             "max_output_diff": float(np.max(np.abs(a[t] - b[t]))) if len(t) else 0.0}
    if series.head == "regression":
        fp32 = score_split(a, series, split, horizon, None)[0]["mae"]
        variant = score_split(b, series, split, horizon, None)[0]["mae"]
        change = (variant - fp32) / fp32 if fp32 else (0.0 if variant == fp32 else float("inf"))
        return {**facts, "criterion": "test_mae", "fp32_test_mae": fp32, "variant_test_mae": variant,
                "test_mae_rel_change": change}
    agree = a[t].argmax(-1) == b[t].argmax(-1)
    return {**facts, "criterion": "top1_agreement", "top1_agreement": float(agree.mean()) if len(t) else 1.0,
            "positions": int(agree.size), "top1_disagreements": int((~agree).sum())}
