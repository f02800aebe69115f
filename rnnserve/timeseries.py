"""CSV time series -> raw feature frames, shared by the forecast trainer and the client (numpy + csv only).

A forecaster's input `features` is [batch, seq, F] in raw units, in the order of its metadata's
feature_names. Each name is one of:
- a numeric CSV column, as it is;
- "hour" (hour of day, 0-24) or "day_of_year" (1-366), computed from the time column;
- the classification target's own column: the index of its label in class_names.
Training picks the names (default_feature_names); a client that streams the same CSV builds the
same frames from the names (frames).
The built-in data are the weather tables the `vega_datasets` package ships as CSV files.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from datetime import UTC, datetime
from typing import Any

import numpy as np

SPLIT = (0.70, 0.15, 0.15)    # chronological: train, validation, test
BUILTIN_PREFIX = "vega:"
# name -> (file shipped in vega_datasets/_data, default target, time column)
BUILTIN = {
    "seattle-temps": ("seattle-temps.csv", "temp", "date"),        # hourly, 2010
    "seattle-weather": ("seattle-weather.csv", "weather", "date"),  # daily, 2012-2015
}
DEFAULT_DATA = BUILTIN_PREFIX + "seattle-temps"
HOUR, DAY_OF_YEAR = "hour", "day_of_year"
HOUR_S, DAY_S = 3600.0, 86400.0
_TIME_FORMATS = ("%Y/%m/%d %H:%M", "%Y/%m/%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S",
                 "%Y-%m-%d")


class TimeSeriesError(ValueError):
    """The CSV is missing, malformed, or its columns do not fit the request."""


def builtin_path(name: str) -> str:
    """The local file of a built-in table (vega_datasets works offline once installed)."""
    if name not in BUILTIN:
        raise TimeSeriesError(f"unknown built-in data {name!r}; choose from {', '.join(BUILTIN)}")
    # Found, not imported: the package imports pandas, and only its data files are needed here.
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise TimeSeriesError("the built-in data need the vega_datasets package (pip install vega_datasets)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_data", BUILTIN[name][0])
    if not os.path.isfile(path):
        raise TimeSeriesError(f"vega_datasets has no {BUILTIN[name][0]} at {path}")
    return path


def resolve(data: str) -> tuple[str, str | None, str | None]:
    """(csv path, default target, default time column) for a path or `vega:<name>`."""
    if data.startswith(BUILTIN_PREFIX):
        name = data[len(BUILTIN_PREFIX):]
        return builtin_path(name), BUILTIN[name][1], BUILTIN[name][2]
    if not os.path.isfile(data):
        raise TimeSeriesError(f"data file not found: {data}")
    return data, None, None


def read_table(path: str) -> dict[str, list[str]]:
    """Columns of a CSV file with a header row, as strings."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise TimeSeriesError(f"{path}: needs a header row and data rows")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
    if bad:
        raise TimeSeriesError(f"{path}: rows {bad[:5]} do not have {len(header)} fields")
    return {h: [r[i].strip() for r in body] for i, h in enumerate(header)}


def parse_time(values: list[str]) -> np.ndarray:
    """Seconds since the epoch for each value, the clock time read as UTC (so no daylight-saving gap or
    repeat, whatever the machine's time zone); the first format that parses all values wins."""
    for fmt in _TIME_FORMATS:
        try:
            return np.array([datetime.strptime(v, fmt).replace(tzinfo=UTC).timestamp() for v in values],
                            dtype=np.float64)
        except ValueError:
            continue
    raise TimeSeriesError(f"cannot parse time values such as {values[0]!r} (formats: {', '.join(_TIME_FORMATS)})")


def to_datetime(seconds: float) -> datetime:
    """The clock time parse_time read."""
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)


def numeric(values: list[str]) -> np.ndarray | None:
    """The column as float64, or None when a value is not a number."""
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def step_seconds(time: np.ndarray) -> float:
    return float(np.median(np.diff(time)))


def class_list(values: list[str]) -> list[str]:
    return sorted(set(values))


def default_feature_names(table: dict[str, list[str]], target: str, time_column: str | None,
                          step: float | None) -> list[str]:
    """The numeric columns and the target (its own history), then the calendar features of the time column."""
    names = [c for c in table if c != time_column and (c == target or numeric(table[c]) is not None)]
    return names + calendar_names(step)


def calendar_names(step: float | None) -> list[str]:
    if step is None:
        return []
    return ([HOUR] if step < DAY_S else []) + [DAY_OF_YEAR]


def frames(table: dict[str, list[str]], feature_names: list[str], time_column: str | None = None,
           class_names: list[str] | None = None) -> np.ndarray:
    """[N, F] float32 raw frames for the given names (see the module docstring)."""
    n = len(next(iter(table.values())))
    stamps = None
    cols: list[Any] = []
    for name in feature_names:
        if name in (HOUR, DAY_OF_YEAR) and name not in table:
            if time_column is None or time_column not in table:
                raise TimeSeriesError(f"feature {name!r} needs the time column (got {time_column!r})")
            if stamps is None:
                stamps = [to_datetime(t) for t in parse_time(table[time_column])]
            cols.append([s.hour + s.minute / 60.0 for s in stamps] if name == HOUR
                        else [s.timetuple().tm_yday for s in stamps])
            continue
        if name not in table:
            raise TimeSeriesError(f"no column {name!r} (columns: {', '.join(table)})")
        values = numeric(table[name])
        if values is None:
            if not class_names:
                raise TimeSeriesError(f"column {name!r} is not numeric (only the classification target, "
                                      f"sent as its class index, may be categorical)")
            unknown = sorted(set(table[name]) - set(class_names))
            if unknown:
                raise TimeSeriesError(f"column {name!r} has labels {unknown[:5]} outside the classes {class_names}")
            values = np.array([class_names.index(v) for v in table[name]], dtype=np.float64)
        cols.append(values)
    x = np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1) if cols else np.zeros((n, 0))
    if not np.all(np.isfinite(x)):
        raise TimeSeriesError("missing or non-finite values in the feature columns")
    return x.astype(np.float32)


def split_bounds(n: int) -> tuple[int, int]:
    """(b0, b1): train = [0, b0), validation = [b0, b1), test = [b1, n)."""
    return int(round(n * SPLIT[0])), int(round(n * (SPLIT[0] + SPLIT[1])))
