"""Task forecast: a recurrent forecaster on a CSV time series (default: Seattle weather, vega_datasets).

Training reads random windows of seq_len rows from the train split (70%, chronological); the loss
skips the first quarter of each window, where the state is still cold. Every eval_interval steps the
whole series runs through the model once (state carried from the first row, as a live sensor
would) and the validation split is scored; the best model is kept. The test split is scored once,
at the end, against the baselines (train/forecast_eval.py).

Files in the output directory:
    checkpoint.pt   the best model (by validation MAE, or macro-F1 for classification)
    metrics.jsonl   one JSON object per train-log / eval event, then the "test" event with the table
    forecast.png    forecast against actual over the test split
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rnnserve.timeseries import DAY_S, DEFAULT_DATA
from rnnserve.train.checkpoint import read_checkpoint, save_checkpoint
from rnnserve.train.forecast_data import Series, load_series, season_candidates
from rnnserve.train.forecast_eval import beats_baselines, format_table, horizon_targets, pick_period, score_split
from rnnserve.train.forecast_model import TASK, Forecaster, ForecastModelConfig
from rnnserve.train.forecast_plot import plot_forecast

log = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 1500  # used when neither max_steps nor time_budget is given


@dataclass
class ForecastConfig:
    out: str
    data: str = DEFAULT_DATA
    target: str | None = None           # default: the built-in table's target
    features: list[str] | None = None   # default: every column but the time column
    time_column: str | None = None      # default: the built-in table's time column
    head: str | None = None             # default: regression for a numeric target, else classification
    horizon: int = 24
    season: int | None = None           # the model's seasonal base period; None: auto (see model_config)
    arch: str = "gru"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    seq_len: int = 128
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int | None = None
    time_budget: float | None = None    # minutes
    eval_interval: int = 250
    seed: int = 1337
    threads: int = 0                    # 0: one thread
    balanced: bool = True               # classification: loss weights 1/sqrt(class frequency)

    def __post_init__(self) -> None:
        if self.max_steps is None and not self.time_budget:
            self.max_steps = DEFAULT_MAX_STEPS
        for name in ("horizon", "seq_len", "batch_size", "eval_interval", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.seq_len < 4:
            raise ValueError("seq_len must be >= 4")

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), task=TASK)


@dataclass
class ForecastResult:
    model: Forecaster
    ckpt_path: str
    series: Series
    test_rows: list[dict[str, Any]]
    beats_baselines: bool
    steps: int


def model_config(cfg: ForecastConfig, series: Series, period: int | None) -> ForecastModelConfig:
    """season auto: the seasonal-naive period picked on validation, for sub-daily data (a daily
    cycle, cheap to carry); otherwise persistence is the base."""
    horizon = cfg.horizon if series.head == "regression" else 1
    season = cfg.season
    if season is None:
        sub_daily = series.step_seconds is not None and series.step_seconds < DAY_S
        season = period if period and sub_daily and period >= horizon else 0
    b0 = series.bounds[0]
    target_index = series.feature_names.index(series.target_name)
    return ForecastModelConfig(
        features=[dataclasses.asdict(f) for f in series.feature_info], head=series.head, horizon=horizon,
        num_classes=len(series.class_names), target_index=target_index,
        target_std=(float(series.target[:b0].std()) or 1.0) if series.head == "regression" else 1.0,
        arch=cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
        season=season if series.head == "regression" else 0)


def run_whole(model: Forecaster, series: Series) -> np.ndarray:
    """The model over the whole series in one pass (batch 1, state from zeros): [N, H] or [N, C]."""
    model.eval()
    with torch.no_grad():
        out, _ = model(torch.from_numpy(series.features)[None])
    return out[0].numpy().astype(np.float64)


def _windows(model: Forecaster, series: Series, targets: np.ndarray, cfg: ForecastConfig, gen: torch.Generator):
    """Random train windows, with the seasonal history a live stream would carry into them."""
    b0, season = series.bounds[0], model.cfg.season
    starts = torch.randint(season, b0 - cfg.seq_len + 1, (cfg.batch_size,), generator=gen).numpy()
    idx = starts[:, None] + np.arange(cfg.seq_len)[None, :]
    state = model.cfg.zero_state(cfg.batch_size)
    if season:
        past = series.features[starts[:, None] + np.arange(-season, 0)[None, :], model.cfg.target_index]
        state = state[:-1] + (torch.from_numpy(np.concatenate([past, np.full((cfg.batch_size, 1), season,
                                                                            np.float32)], axis=1)),)
    return torch.from_numpy(series.features[idx]), state, torch.from_numpy(targets[idx])


def _loss(model: Forecaster, series: Series, x: torch.Tensor, state, y: torch.Tensor,
          class_weights: torch.Tensor | None) -> torch.Tensor:
    out, _ = model(x, state)
    burn = x.shape[1] // 4
    out, y = out[:, burn:], y[:, burn:]
    if series.head == "classification":
        keep = y >= 0
        return F.cross_entropy(out[keep], y[keep], weight=class_weights)
    keep = torch.isfinite(y)
    return F.mse_loss(out[keep] / model.cfg.target_std, y[keep].float() / model.cfg.target_std)


def _train_targets(series: Series, horizon: int) -> np.ndarray:
    """Per-row targets with everything at or past the train boundary masked (NaN / -1): no leaks."""
    b0 = series.bounds[0]
    if series.head == "classification":
        y = np.full(len(series.target), -1, dtype=np.int64)
        y[: b0 - 1] = series.target[1:b0]
        return y
    y = horizon_targets(series.target.astype(np.float64), horizon)
    for k in range(horizon):
        y[max(b0 - k - 1, 0):, k] = np.nan
    return y.astype(np.float32)


def _val_key(rows: list[dict[str, Any]]) -> float:
    """Lower is better: MAE for regression, -(macro-F1 + accuracy) for classification."""
    m = rows[0]
    return m["mae"] if "mae" in m else -(m["macro_f1"] + m["accuracy"])


def train_forecast(cfg: ForecastConfig) -> ForecastResult:
    # Small recurrent steps: one thread is as fast as two here, and far faster on a loaded CPU.
    torch.set_num_threads(cfg.threads or 1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    series = load_series(cfg.data, cfg.target, cfg.features, cfg.time_column, cfg.head)
    if series.bounds[0] < cfg.seq_len + 2:
        raise ValueError(f"the train split has {series.bounds[0]} rows; seq_len {cfg.seq_len} needs more")
    horizon = cfg.horizon if series.head == "regression" else 1
    period = pick_period(series.target.astype(np.float64), series.split("val"), horizon,
                         season_candidates(series.step_seconds)) if series.head == "regression" else None
    model = Forecaster(model_config(cfg, series, period))
    targets = _train_targets(series, horizon)
    class_weights = None
    if series.head == "classification" and cfg.balanced:  # macro-F1 counts rare classes as much as common ones
        counts = np.bincount(series.target[:series.bounds[0]], minlength=len(series.class_names)) + 1.0
        class_weights = torch.tensor((counts.sum() / counts) ** 0.5, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    os.makedirs(cfg.out, exist_ok=True)
    best_path = os.path.join(cfg.out, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    open(metrics_path, "w").close()
    log.info("forecast %s -> %s (%s, horizon %d, season %d, baseline period %s): %s, %d params", cfg.data,
             series.target_name, series.head, horizon, model.cfg.season, period, model.cfg.arch, model.num_params())
    extra = {"task": TASK, "class_names": series.class_names, "feature_names": series.feature_names}

    def write(event: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    t0, step, best, loss_sum, loss_n = time.perf_counter(), 0, math.inf, 0.0, 0

    def progress() -> float:
        p = step / cfg.max_steps if cfg.max_steps else 0.0
        if cfg.time_budget:
            p = max(p, (time.perf_counter() - t0) / (cfg.time_budget * 60.0))
        return min(p, 1.0)

    def evaluate() -> None:
        nonlocal best, loss_sum, loss_n
        rows = score_split(run_whole(model, series), series, series.split("val"), horizon, period)
        key = _val_key(rows)
        event = {"event": "eval", "step": step, "train_loss": loss_sum / max(loss_n, 1),
                 "elapsed_s": round(time.perf_counter() - t0, 2), "val": rows}
        if key < best:
            best, event["best"] = key, True
            save_checkpoint(best_path, model, [], cfg.to_dict(), {"step": step, "val": rows}, extra=extra)
        write(event)
        log.info("step %d: train loss %.4f, val %s", step, event["train_loss"],
                 ", ".join(f"{k} {v:.4f}" for k, v in rows[0].items() if k != "name"))
        loss_sum, loss_n = 0.0, 0
        model.train()

    model.train()
    while progress() < 1.0:
        for g in opt.param_groups:  # cosine decay to 5% over the budget
            g["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress())))
        x, state, y = _windows(model, series, targets, cfg, gen)
        loss = _loss(model, series, x, state, y, class_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % cfg.eval_interval == 0:
            evaluate()
    if step % cfg.eval_interval or not os.path.exists(best_path):
        evaluate()

    ckpt = read_checkpoint(best_path)
    model.load_state_dict(ckpt["state_dict"])
    whole = run_whole(model, series)
    rows = score_split(whole, series, series.split("test"), horizon, period)
    wins = beats_baselines(rows)
    metrics = dict(ckpt["metrics"], test=rows, beats_baselines=wins, seasonal_period=period,
                   steps=step, num_params=model.num_params(), elapsed_s=round(time.perf_counter() - t0, 1))
    save_checkpoint(best_path, model, [], cfg.to_dict(), metrics, extra=extra)
    write({"event": "test", "checkpoint_step": ckpt["metrics"]["step"], "rows": rows,
           "beats_baselines": wins, "seasonal_period": period, "horizon": horizon,
           "split": dict(zip(("train", "val", "test"), map(list, map(series.split, ("train", "val", "test")))))})
    plot_forecast(series, whole, horizon, os.path.join(cfg.out, "forecast.png"))
    print(f"test split ({series.target_name}, {series.head}, horizon {horizon}):")
    print(format_table(rows))
    print("the model beats every baseline" if wins else "the model does NOT beat every baseline")
    return ForecastResult(model=model.eval(), ckpt_path=best_path, series=series, test_rows=rows,
                          beats_baselines=wins, steps=step)
