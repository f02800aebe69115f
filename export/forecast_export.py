"""A forecast checkpoint -> model.onnx through export_module (the general exporter and gate).

I/O: `features` FP32 [batch, seq, F] in raw units, in the order of the metadata's feature_names
(a categorical feature is the index of its class in class_names); `forecast` FP32 [batch, seq, H]
in raw units, or `class_logits` FP32 [batch, seq, C] with class_names in the metadata; states
h0/hn (+ c0/cn for LSTM) [layers, batch, hidden], and, for a seasonal base, history_in /
history_out [batch, P + 1] (the last P target values and the count of steps seen).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rnnserve.export.module import export_module
from rnnserve.export.module_parity import GATE_SEQ_LENS
from rnnserve.export.onnx_export import DEFAULT_OPSET, ExportResult
from rnnserve.export.tolerance import ATOL, RTOL
from rnnserve.train.forecast_model import Forecaster

INPUT_FEATURES = "features"
OUTPUT_FORECAST = "forecast"
OUTPUT_CLASS_LOGITS = "class_logits"
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 4, 48


class ForecastGraph(nn.Module):
    """(features, *state) -> (forecast | class_logits, *new_state): the graph's flat I/O."""

    def __init__(self, model: Forecaster):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, *state: torch.Tensor):
        out, new_state = self.model(features, tuple(state))
        return (out, *new_state)


def state_names(model: Forecaster) -> list[tuple[str, str]]:
    pairs = [("h0", "hn"), ("c0", "cn")][:model.cfg.rnn_states]
    return pairs + ([("history_in", "history_out")] if model.cfg.season else [])


def example_features(model: Forecaster, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """Raw feature frames inside the train ranges (whole numbers for calendar and category features)."""
    cols = []
    for f in model.cfg.features:
        if f["kind"] == "numeric":
            cols.append(rng.uniform(f["lo"], f["hi"], (batch, seq)))
        else:
            cols.append(rng.integers(int(f["lo"]), int(f["hi"]) + 1, (batch, seq)))
    return np.stack(cols, axis=-1).astype(np.float32)


def export_forecaster(model: Forecaster, ckpt: dict[str, Any], checkpoint_sha256: str, out_dir: str, *,
                      opset: int = DEFAULT_OPSET, gate: bool = True, atol: float = ATOL, rtol: float = RTOL,
                      threads: int | None = None) -> ExportResult:
    cfg = model.cfg
    rng = np.random.default_rng(0)
    inputs = {INPUT_FEATURES: torch.from_numpy(example_features(model, _EXAMPLE_BATCH, _EXAMPLE_SEQ, rng))}
    zero = cfg.zero_state(_EXAMPLE_BATCH)
    if cfg.season:  # a full period seen, so the example exercises the seasonal base
        zero = zero[:-1] + (torch.cat([torch.from_numpy(example_features(model, _EXAMPLE_BATCH, cfg.season, rng)
                                                        [..., cfg.target_index]),
                                       torch.full((_EXAMPLE_BATCH, 1), float(cfg.season))], dim=1),)
    pairs = state_names(model)
    inputs.update({s_in: t for (s_in, _), t in zip(pairs, zero)})
    out_name = OUTPUT_FORECAST if cfg.head == "regression" else OUTPUT_CLASS_LOGITS
    seq_len = ckpt["train_config"].get("seq_len")
    seq_lens = sorted(set(GATE_SEQ_LENS) | ({seq_len, 4 * seq_len} if isinstance(seq_len, int) else set()))
    return export_module(
        ForecastGraph(model).eval(), out_dir, inputs=inputs, outputs=[out_name, *(o for _, o in pairs)],
        states=pairs, feature_names=cfg.feature_names, class_names=ckpt.get("class_names") or None,
        model_config=cfg.to_dict(), train_config=ckpt["train_config"], checkpoint_sha256=checkpoint_sha256,
        opset=opset, gate=gate, atol=atol, rtol=rtol, seq_lens=seq_lens,
        argmax_output=OUTPUT_CLASS_LOGITS if cfg.head == "classification" else None, threads=threads)
