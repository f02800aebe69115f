"""Data for the forecast task: a CSV time series -> raw feature frames, targets and a chronological split.

Features are kept in RAW units here; the model normalizes inside its own graph (so the exported
model takes and returns raw units). Each feature column has a kind:
- "numeric": a number, normalized with the train split's mean and std;
- "hour": hour of day (0-24) and "doy": day of year (1-366), both derived from the time column and
  turned into sin/cos inside the model;
- "category": the index of a label in the column's class list (one-hot inside the model).
The split is chronological (train 70% / validation 15% / test 15%); statistics come from train only.
Reading the CSV and building the frames is rnnserve/timeseries.py (the client streams the same frames).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from rnnserve.timeseries import (
    DAY_OF_YEAR,
    DAY_S,
    HOUR,
    HOUR_S,
    TimeSeriesError,
    calendar_names,
    class_list,
    default_feature_names,
    frames,
    numeric,
    parse_time,
    read_table,
    resolve,
    split_bounds,
    step_seconds,
)

log = logging.getLogger(__name__)

ForecastDataError = TimeSeriesError


@dataclass
class FeatureInfo:
    name: str
    kind: str                 # numeric | hour | doy | category
    mean: float = 0.0
    std: float = 1.0
    lo: float = 0.0           # train range (example inputs for export)
    hi: float = 1.0


@dataclass
class Series:
    """A whole table as model inputs, in raw units, and its chronological split."""
    features: np.ndarray                 # [N, F] float32, raw units
    feature_info: list[FeatureInfo]
    target: np.ndarray                   # [N] float64 (regression) or int64 class ids (classification)
    target_name: str
    head: str                            # regression | classification
    class_names: list[str] = field(default_factory=list)
    time: np.ndarray | None = None       # [N] seconds, when a time column was given
    step_seconds: float | None = None
    bounds: tuple[int, int] = (0, 0)     # train = [0, b0), val = [b0, b1), test = [b1, N)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.feature_info]

    def split(self, part: str) -> tuple[int, int]:
        b0, b1 = self.bounds
        return {"train": (0, b0), "val": (b0, b1), "test": (b1, len(self.target))}[part]


def load_series(data: str, target: str | None = None, features: list[str] | None = None,
                time_column: str | None = None, head: str | None = None) -> Series:
    """Read `data` (a CSV path or vega:<name>) into a Series; the split's statistics come from train."""
    path, default_target, default_time = resolve(data)
    table = read_table(path)
    target = target or default_target
    time_column = time_column if time_column is not None else default_time
    if not target:
        raise ForecastDataError(f"--target is required for {path} (columns: {', '.join(table)})")
    for col in [target, *(features or [])] + ([time_column] if time_column else []):
        if col not in table:
            raise ForecastDataError(f"{path} has no column {col!r} (columns: {', '.join(table)})")
    n = len(table[target])
    if n < 40:
        raise ForecastDataError(f"{path}: {n} rows are too few to split 70/15/15 and train")
    target_numeric = numeric(table[target])
    head = head or ("regression" if target_numeric is not None else "classification")
    if head == "regression" and target_numeric is None:
        raise ForecastDataError(f"target {target!r} is not numeric; use the classification head")
    time, step = None, None
    if time_column:
        time = parse_time(table[time_column])
        if np.any(np.diff(time) <= 0):
            raise ForecastDataError(f"time column {time_column!r} is not strictly increasing")
        step = step_seconds(time)
    if features is None:
        features = default_feature_names(table, target, time_column, step)
    else:
        other = [c for c in features if c != target and numeric(table[c]) is None]
        if other:
            raise ForecastDataError(f"feature columns {other} are not numeric (only the classification target "
                                    f"may be categorical)")
        features = ([] if target in features else [target]) + features + calendar_names(step)
    class_names = class_list(table[target]) if head == "classification" else []
    x = frames(table, features, time_column, class_names)
    tgt = (np.array([class_names.index(v) for v in table[target]], dtype=np.int64) if class_names
           else target_numeric)
    infos = []
    for name in features:
        if name in (HOUR, DAY_OF_YEAR) and name not in table:
            infos.append(FeatureInfo(name, "hour", lo=0, hi=23) if name == HOUR
                         else FeatureInfo(name, "doy", lo=1, hi=366))
        elif numeric(table[name]) is None:
            infos.append(FeatureInfo(name, "category", lo=0, hi=len(class_names) - 1))
        else:
            infos.append(FeatureInfo(name, "numeric"))
    b0, b1 = split_bounds(n)
    for i, info in enumerate(infos):
        if info.kind == "numeric":  # train only: nothing from validation or test leaks in
            tr = x[:b0, i]
            info.mean, info.std = float(tr.mean()), float(tr.std()) or 1.0
            info.lo, info.hi = float(tr.min()), float(tr.max())
    log.info("%s: %d rows, features %s, target %s (%s), split %d/%d/%d", path, n, [f.name for f in infos],
             target, head, b0, b1 - b0, n - b1)
    return Series(features=x.astype(np.float32), feature_info=infos, target=tgt, target_name=target, head=head,
                  class_names=class_names, time=time, step_seconds=step, bounds=(b0, b1))


def season_candidates(step_seconds: float | None) -> list[int]:
    """Seasonal-naive periods in steps: a day and a week for hourly data, a week and a year for daily data."""
    if step_seconds is None:
        return []
    if step_seconds <= HOUR_S * 1.5:
        per_hour = HOUR_S / step_seconds
        return [int(round(24 * per_hour)), int(round(168 * per_hour))]
    if step_seconds <= DAY_S * 1.5:
        return [7, 365]
    return []


def calendar_angle(kind: str, value):
    """The angle, in radians, of an hour-of-day or day-of-year value (numpy or torch)."""
    period = 24.0 if kind == "hour" else 365.25
    return value * (2.0 * math.pi / period)
