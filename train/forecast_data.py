"""Data for the forecast task: a CSV time series -> raw feature frames, targets and a chronological split.

Features are kept in RAW units here; the model normalizes inside its own graph (so the exported
model takes and returns raw units). Each feature column has a kind:
- "numeric": a number, normalized with the train split's mean and std;
- "hour": hour of day (0-24) and "doy": day of year (1-366), both derived from the time column and
  turned into sin/cos inside the model;
- "category": the index of a label in the column's class list (one-hot inside the model).
The split is chronological (train 70% / validation 15% / test 15%); statistics come from train only.
The built-in data are the weather tables the `vega_datasets` package ships as CSV files.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

log = logging.getLogger(__name__)

SPLIT = (0.70, 0.15, 0.15)
BUILTIN_PREFIX = "vega:"
# name -> (file shipped in vega_datasets/_data, default target, time column)
BUILTIN = {
    "seattle-temps": ("seattle-temps.csv", "temp", "date"),        # hourly, 2010
    "seattle-weather": ("seattle-weather.csv", "weather", "date"),  # daily, 2012-2015
}
DEFAULT_DATA = BUILTIN_PREFIX + "seattle-temps"
_TIME_FORMATS = ("%Y/%m/%d %H:%M", "%Y/%m/%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S",
                 "%Y-%m-%d")
HOUR_S, DAY_S = 3600.0, 86400.0


class ForecastDataError(Exception):
    """The CSV is missing, malformed, or its columns do not fit the request."""


def builtin_path(name: str) -> str:
    """The local file of a built-in table (vega_datasets works offline once installed)."""
    if name not in BUILTIN:
        raise ForecastDataError(f"unknown built-in data {name!r}; choose from {', '.join(BUILTIN)}")
    try:
        import vega_datasets
    except ImportError as e:
        raise ForecastDataError("the built-in data need the vega_datasets package: pip install -e '.[train]'") from e
    path = os.path.join(os.path.dirname(vega_datasets.__file__), "_data", BUILTIN[name][0])
    if not os.path.isfile(path):
        raise ForecastDataError(f"vega_datasets has no {BUILTIN[name][0]} at {path}")
    return path


def resolve(data: str) -> tuple[str, str | None, str | None]:
    """(csv path, default target, default time column) for a path or `vega:<name>`."""
    if data.startswith(BUILTIN_PREFIX):
        name = data[len(BUILTIN_PREFIX):]
        path = builtin_path(name)
        return path, BUILTIN[name][1], BUILTIN[name][2]
    if not os.path.isfile(data):
        raise ForecastDataError(f"data file not found: {data}")
    return data, None, None


def read_table(path: str) -> dict[str, list[str]]:
    """Columns of a CSV file with a header row, as strings."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ForecastDataError(f"{path}: needs a header row and data rows")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
    if bad:
        raise ForecastDataError(f"{path}: rows {bad[:5]} do not have {len(header)} fields")
    return {h: [r[i].strip() for r in body] for i, h in enumerate(header)}


def parse_time(values: list[str]) -> np.ndarray:
    """Seconds since the epoch (naive local time) for each value; the first format that parses all wins."""
    for fmt in _TIME_FORMATS:
        try:
            return np.array([datetime.strptime(v, fmt).timestamp() for v in values], dtype=np.float64)
        except ValueError:
            continue
    raise ForecastDataError(f"cannot parse time values such as {values[0]!r} (formats: {', '.join(_TIME_FORMATS)})")


def _numeric(name: str, values: list[str]) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


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
    target_numeric = _numeric(target, table[target])
    head = head or ("regression" if target_numeric is not None else "classification")
    if head == "regression" and target_numeric is None:
        raise ForecastDataError(f"target {target!r} is not numeric; use the classification head")
    if features is None:  # the numeric columns and the target (its own history)
        features = [c for c in table if c != time_column and (c == target or _numeric(c, table[c]) is not None)]
    elif target not in features:
        features = [target, *features]

    class_names: list[str] = []
    if head == "classification":
        class_names = sorted(set(table[target]))
        tgt = np.array([class_names.index(v) for v in table[target]], dtype=np.int64)
    else:
        tgt = target_numeric
    infos, cols = [], []
    for col in features:
        values = _numeric(col, table[col])
        if values is not None:
            infos.append(FeatureInfo(col, "numeric"))
        elif col == target and class_names:
            infos.append(FeatureInfo(col, "category", lo=0, hi=len(class_names) - 1))
            values = tgt.astype(np.float64)
        else:
            raise ForecastDataError(f"feature column {col!r} is not numeric (only the classification "
                                    f"target may be categorical)")
        cols.append(values)
    time, step = None, None
    if time_column:
        time = parse_time(table[time_column])
        if np.any(np.diff(time) <= 0):
            raise ForecastDataError(f"time column {time_column!r} is not strictly increasing")
        step = float(np.median(np.diff(time)))
        stamps = [datetime.fromtimestamp(t) for t in time]
        if step < DAY_S:
            infos.append(FeatureInfo("hour", "hour", lo=0, hi=23))
            cols.append(np.array([s.hour + s.minute / 60.0 for s in stamps]))
        infos.append(FeatureInfo("day_of_year", "doy", lo=1, hi=366))
        cols.append(np.array([s.timetuple().tm_yday for s in stamps], dtype=np.float64))
    x = np.stack(cols, axis=1)
    if not np.all(np.isfinite(x)):
        raise ForecastDataError(f"{path}: missing or non-finite values in the feature columns")
    b0 = int(round(n * SPLIT[0]))
    b1 = int(round(n * (SPLIT[0] + SPLIT[1])))
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
