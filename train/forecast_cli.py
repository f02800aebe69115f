"""The forecast task's command-line flags and runner (rnnserve-train --task forecast)."""
from __future__ import annotations

import argparse

from rnnserve.cli import comma_names, user_error
from rnnserve.timeseries import BUILTIN, DEFAULT_DATA
from rnnserve.train.forecast import ForecastConfig, train_forecast
from rnnserve.train.forecast_data import ForecastDataError
from rnnserve.train.forecast_model import FORECAST_ARCHS, HEADS

_D = ForecastConfig.__dataclass_fields__


def add_forecast_args(g) -> None:
    g.add_argument("--data", default=DEFAULT_DATA,
                   help=f"CSV file with a header row, or vega:NAME for the built-in weather tables "
                        f"({', '.join(BUILTIN)}; default {DEFAULT_DATA})")
    g.add_argument("--target", help="column to forecast (default: the built-in table's: temp / weather)")
    g.add_argument("--features", type=comma_names, help="input columns, comma-separated (default: all but the time "
                                                     "column; the target is always one)")
    g.add_argument("--time-column", help="time column: gives calendar features and the seasonal baseline "
                                         "(default: the built-in table's `date`)")
    g.add_argument("--head", choices=HEADS, help="default: regression for a numeric target, else classification")
    g.add_argument("--season", type=int, help="regression: the seasonal period (steps) the model's base "
                                              "forecast uses; 0 = persistence (default: auto)")
    g.add_argument("--horizon", type=int, default=_D["horizon"].default,
                   help="regression: forecast the next H values (default %(default)s)")


def run_forecast(args, p: argparse.ArgumentParser) -> int:
    if args.arch is not None and args.arch not in FORECAST_ARCHS:
        p.error(f"--task forecast needs --arch in {FORECAST_ARCHS}")
    given = {k: getattr(args, k) for k in ("arch", "hidden_size", "num_layers", "dropout", "lr", "seed",
                                           "weight_decay", "max_steps", "time_budget")
             if getattr(args, k) is not None}
    try:
        cfg = ForecastConfig(out=args.out or "runs/forecast/weather", data=args.data, target=args.target,
                             features=args.features, time_column=args.time_column, head=args.head,
                             horizon=args.horizon, season=args.season, seq_len=args.seq_len,
                             batch_size=args.batch_size, eval_interval=args.eval_interval, threads=args.threads,
                             **given)
    except ValueError as e:
        p.error(str(e))
    try:
        train_forecast(cfg)
    except (ForecastDataError, ValueError) as e:  # the data do not fit the request: a user error
        return user_error(str(e))
    return 0
