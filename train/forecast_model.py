"""The forecaster: raw feature frames [batch, seq, F] -> a forecast or class logits per step.

Normalization lives inside the module (buffers fitted on the train split), so the exported
graph takes raw units and, for regression, returns raw units:
- numeric features: (x - mean) / std;
- hour of day / day of year: sin and cos of their angle;
- a categorical feature (the classification target's own history): one-hot of its class index.
Regression predicts the next H values as a baseline plus a scaled correction
(forecast = base + head * target_std), so the untrained model starts at a baseline:
- season = 0: base = the last observed target (persistence);
- season = P > 0: base = seasonal naive, the target one period P earlier than each forecast
  time. The last P target values travel in a second state, `history` [batch, P + 1] (batch
  axis 0; the last column counts the steps seen, capped at P), so streaming one reading at a
  time equals the whole run. Where fewer than P steps were seen, the base falls back to
  persistence. The recurrent core also sees the change since one period ago.
The recurrent core is nn.RNN/LSTM/GRU (batch_first); its state is [layers, batch, hidden] as
for the char models, so a sensor can stream one reading at a time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from rnnserve.contract import state_shape
from rnnserve.train.checkpoint import CheckpointError, read_checkpoint
from rnnserve.train.forecast_data import calendar_angle

FORECAST_ARCHS = ("rnn", "lstm", "gru")
HEADS = ("regression", "classification")
KINDS = ("numeric", "hour", "doy", "category")
TASK = "forecast"


@dataclass
class ForecastModelConfig:
    features: list[dict[str, Any]] = field(default_factory=list)  # [{name, kind, mean, std, lo, hi}] in input order
    head: str = "regression"
    horizon: int = 1                      # regression: values predicted after each step
    num_classes: int = 0                  # classification
    target_index: int = 0                 # the target's own column among the features
    target_std: float = 1.0               # regression: the scale of a predicted change
    arch: str = "gru"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    season: int = 0                       # regression: the seasonal period P of the base (0: persistence)

    def __post_init__(self) -> None:
        if self.arch not in FORECAST_ARCHS:
            raise ValueError(f"arch must be one of {FORECAST_ARCHS}, got {self.arch!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if not self.features:
            raise ValueError("a forecaster needs at least one feature")
        if any(f["kind"] not in KINDS for f in self.features):
            raise ValueError(f"feature kinds must be in {KINDS}")
        if self.hidden_size < 1 or self.num_layers < 1 or self.horizon < 1:
            raise ValueError("hidden_size, num_layers and horizon must be >= 1")
        if self.head == "classification" and self.num_classes < 2:
            raise ValueError("a classification head needs num_classes >= 2")
        if not 0 <= self.target_index < len(self.features):
            raise ValueError("target_index is outside the features")
        if self.season and (self.head != "regression" or self.season < self.horizon):
            raise ValueError("season needs a regression head and season >= horizon")

    @property
    def out_size(self) -> int:
        return self.horizon if self.head == "regression" else self.num_classes

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.features]

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        return state_shape(self.num_layers, 1, batch, self.hidden_size)

    @property
    def rnn_states(self) -> int:
        return 2 if self.arch == "lstm" else 1

    def zero_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        state = tuple(torch.zeros(self.state_shape(batch)) for _ in range(self.rnn_states))
        return state + ((torch.zeros(batch, self.season + 1),) if self.season else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForecastModelConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown forecast model config keys: {sorted(unknown)}")
        return cls(**d)


class Forecaster(nn.Module):
    """features [B, T, F] raw -> (forecast [B, T, H] raw | class_logits [B, T, C], new state)."""

    def __init__(self, cfg: ForecastModelConfig):
        super().__init__()
        self.cfg = cfg
        kinds = [f["kind"] for f in cfg.features]
        self.numeric = [i for i, k in enumerate(kinds) if k == "numeric"]
        self.calendar = [(i, k) for i, k in enumerate(kinds) if k in ("hour", "doy")]
        self.category = [i for i, k in enumerate(kinds) if k == "category"]
        num = [cfg.features[i] for i in self.numeric]
        self.register_buffer("mean", torch.tensor([f["mean"] for f in num], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([f["std"] for f in num], dtype=torch.float32))
        self.register_buffer("classes", torch.arange(max(cfg.num_classes, 1), dtype=torch.float32))
        input_size = (len(self.numeric) + 2 * len(self.calendar) + cfg.num_classes * len(self.category)
                      + (2 if cfg.season else 0))
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.arch]
        self.rnn = rnn_cls(input_size, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
                           dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cfg.hidden_size, cfg.out_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.numeric:
            parts.append((x[..., self.numeric] - self.mean) / self.std)
        for i, kind in self.calendar:
            angle = calendar_angle(kind, x[..., i:i + 1])
            parts += [torch.sin(angle), torch.cos(angle)]
        for i in self.category:
            parts.append((x[..., i:i + 1] == self.classes).to(x.dtype))
        return torch.cat(parts, dim=-1)

    def _seasonal(self, x_t: torch.Tensor, history: torch.Tensor):
        """(base [B, T, H], change-since-a-period features [B, T, 2], new history) for season P."""
        P, H = self.cfg.season, self.cfg.horizon
        count = history[:, P:]                                   # [B, 1] steps seen before this chunk
        z = torch.cat([history[:, :P], x_t], dim=1)              # [B, P + T]: z[:, j] is step j - P
        pos = torch.arange(x_t.shape[1], device=x_t.device)      # [T]
        ahead = torch.arange(1, H + 1, device=x_t.device)        # [H]
        # Forecast t + k (k = 1..H, k <= P) is based on step t + k - P, i.e. z[:, t + k].
        base = z[:, pos[:, None] + ahead[None, :]]               # [B, T, H]
        seen = count[:, :, None] + pos.to(x_t.dtype)[None, :, None]
        base = torch.where(seen + (ahead - P).to(x_t.dtype) >= 0, base, x_t[:, :, None])
        valid = (seen[..., 0] >= P).to(x_t.dtype)                # a whole period seen at step t
        change = (x_t - z[:, :x_t.shape[1]]) * valid / self.cfg.target_std
        new_count = torch.clamp(count + pos[-1:].to(x_t.dtype) + 1, max=float(P))
        # The reshape states the fixed width for the exported graph's shape inference.
        new_history = torch.cat([z[:, -P:], new_count], dim=1).reshape(-1, P + 1)
        return base, torch.stack([change, valid], dim=-1), new_history

    def forward(self, features: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None):
        """state: (h[, c]) plus, with a season, history; None = zeros."""
        cfg = self.cfg
        state = self.cfg.zero_state(features.shape[0]) if state is None else tuple(state)
        x = self.encode(features)
        t = cfg.target_index
        if cfg.season:
            base, extra, history = self._seasonal(features[..., t], state[-1])
            x = torch.cat([x, extra], dim=-1)
        rnn_state = state[:cfg.rnn_states]
        y, new = self.rnn(x, rnn_state if cfg.arch == "lstm" else rnn_state[0])
        new_state = tuple(new) if cfg.arch == "lstm" else (new,)
        out = self.fc(self.drop(y))
        if cfg.head == "regression":
            out = (base if cfg.season else features[..., t:t + 1]) + out * cfg.target_std
        if cfg.season:
            new_state += (history,)
        return out, new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_forecast_checkpoint(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("task") == TASK


def load_forecaster(path: str) -> tuple[Forecaster, dict[str, Any]]:
    """Rebuild a forecaster from its checkpoint alone. Returns (model in eval mode, ckpt dict)."""
    ckpt = read_checkpoint(path)
    if not is_forecast_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a forecast checkpoint")
    try:
        model = Forecaster(ForecastModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the forecaster: {e}") from e
    return model.eval(), ckpt
