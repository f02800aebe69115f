"""`rnnserve-client forecast MODEL --data FILE.csv`: stream CSV rows through a served forecaster.

The rows go into one sequence (the server keeps the model's state): first --warmup rows in one
request with sequence_start, then one request per row, the last with sequence_end. Each answer's
forecast (or class) is printed against what actually came next. The frames are built from the
CSV as training built them (rnnserve.timeseries), in the order of the model's feature_names as
the server reports them (ModelConfig parameters); --feature-names / --class-names override.
"""
from __future__ import annotations

import json
import random

import numpy as np

from rnnserve.cli import comma_names, user_error
from rnnserve.timeseries import (
    DEFAULT_DATA,
    TimeSeriesError,
    class_list,
    default_feature_names,
    frames,
    numeric,
    parse_time,
    read_table,
    resolve,
    split_bounds,
    step_seconds,
    to_datetime,
)

OUTPUTS = ("forecast", "class_logits")


def add_parser(command) -> None:
    p = command("forecast", cmd_forecast, "stream CSV rows through a forecaster's sequence", model=True)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"CSV file or vega:NAME (default {DEFAULT_DATA})")
    p.add_argument("--target", help="the forecast column (default: the built-in table's)")
    p.add_argument("--time-column", help="time column (default: the built-in table's `date`)")
    p.add_argument("--feature-names", type=comma_names, help="the model's feature_names (default: as training chose)")
    p.add_argument("--class-names", type=comma_names, help="the model's class_names (default: the target's labels)")
    p.add_argument("--start-row", type=int, help="first row to print (default: the start of the test split)")
    p.add_argument("--rows", type=int, default=24, help="rows streamed one at a time (default %(default)s)")
    p.add_argument("--warmup", type=int, default=48, help="rows sent first, in one request (default %(default)s)")
    p.add_argument("--sequence-id", type=int, help="the sequence the rows go into (default: a random id)")


def served_names(client, args) -> dict[str, list[str]]:
    """feature_names / class_names from the model's metadata, as the server reports them in ModelConfig."""
    params = client.config(args.model, args.version).get("parameters", {})
    return {k: json.loads(params[k]["string_value"]) for k in ("feature_names", "class_names") if k in params}


def load_frames(args, served: dict[str, list[str]] | None = None) -> dict:
    served = served or {}
    path, default_target, default_time = resolve(args.data)
    table = read_table(path)
    target = args.target or default_target
    if not target or target not in table:
        raise TimeSeriesError(f"--target must name a column of {path} ({', '.join(table)})")
    time_column = args.time_column or default_time
    times = parse_time(table[time_column]) if time_column else None
    step = step_seconds(times) if times is not None else None
    actual = numeric(table[target])
    class_names = None if actual is not None else (args.class_names or served.get("class_names")
                                                   or class_list(table[target]))
    if class_names is not None:
        actual = np.array([class_names.index(v) if v in class_names else -1 for v in table[target]])
    names = args.feature_names or served.get("feature_names") or default_feature_names(table, target, time_column,
                                                                                        step)
    return {"x": frames(table, names, time_column, class_names), "actual": actual, "times": times,
            "class_names": class_names, "target": target, "feature_names": names}


def _label(data: dict, i: int) -> str:
    if data["times"] is not None:
        return to_datetime(data["times"][i]).strftime("%Y-%m-%d %H:%M")
    return f"row {i}"


def _fmt(data: dict, v) -> str:
    if v is None:
        return "-"
    return data["class_names"][int(v)] if data["class_names"] is not None else f"{v:.2f}"


def cmd_forecast(client, args) -> dict:
    try:
        data = load_frames(args, served_names(client, args))
    except TimeSeriesError as e:
        raise SystemExit(user_error(str(e))) from None
    x, n = data["x"], len(data["actual"])
    start = split_bounds(n)[1] if args.start_row is None else args.start_row
    warm = max(0, min(args.warmup, start))
    if not 0 <= start < n or args.rows < 1:
        raise SystemExit(user_error(f"--start-row must be in [0, {n}) and --rows >= 1"))
    rows = min(args.rows, n - start)
    seq_id = args.sequence_id or random.randint(1, 2**31 - 1)
    out_name, results = None, []

    def step(lo: int, hi: int, first: bool, last: bool):
        nonlocal out_name
        outs = client.infer_tensors(args.model, {"features": x[None, lo:hi]}, version=args.version,
                                    sequence_id=seq_id, start=first, end=last)
        out_name = next((o for o in OUTPUTS if o in outs), None)
        if out_name is None:
            raise SystemExit(f"error: the model answered {sorted(outs)}, none of {list(OUTPUTS)}")
        return outs[out_name][0, -1]

    if warm:
        step(start - warm, start, True, False)
    for i in range(start, start + rows):
        y = step(i, i + 1, i == start and not warm, i == start + rows - 1)
        results.append((i, y))
    return _report(args, data, results, out_name, seq_id, warm)


def _report(args, data: dict, results, out_name: str | None, seq_id: int, warm: int) -> dict:
    actual, n = data["actual"], len(data["actual"])
    classify = out_name == "class_logits"
    horizon = 1 if classify else len(results[0][1])
    table, err1, errh, pers = [], [], [], []
    for i, y in results:
        nxt = actual[i + 1] if i + 1 < n else None
        far = actual[i + horizon] if i + horizon < n else None
        f1 = int(np.argmax(y)) if classify else float(y[0])
        fh = None if classify else float(y[-1])
        row = {"row": i, "time": _label(data, i), "now": actual[i].item(), "forecast_next": f1,
               "actual_next": None if nxt is None else nxt.item()}
        if not classify:
            row.update(forecast_last=fh, actual_last=None if far is None else far.item())
        table.append(row)
        if nxt is not None:
            err1.append(f1 == nxt if classify else abs(f1 - nxt))
            pers.append(actual[i] == nxt if classify else abs(actual[i] - nxt))
        if far is not None and not classify:
            errh.append(abs(fh - far))
    summary = ({"accuracy_next": float(np.mean(err1)), "accuracy_same_as_now": float(np.mean(pers))} if classify
               else {"mae_next": float(np.mean(err1)), "mae_persistence_next": float(np.mean(pers)),
                     f"mae_{horizon}_ahead": float(np.mean(errh)) if errh else None})
    if not args.json:
        print(f"{args.model}: sequence {seq_id}, {warm} warm-up rows, then {len(results)} rows one at a time "
              f"({data['target']}; features {', '.join(data['feature_names'])})")
        head = ["time", "now", "forecast +1", "actual +1"] + ([] if classify else [f"forecast +{horizon}",
                                                                                   f"actual +{horizon}"])
        lines = [head] + [[r["time"], _fmt(data, r["now"]), _fmt(data, r["forecast_next"]),
                           _fmt(data, r["actual_next"])]
                          + ([] if classify else [_fmt(data, r["forecast_last"]), _fmt(data, r["actual_last"])])
                          for r in table]
        widths = [max(len(str(line[k])) for line in lines) for k in range(len(head))]
        for line in lines:
            print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
        print("  ".join(f"{k} {v:.4f}" for k, v in summary.items() if v is not None))
    return {"model": args.model, "sequence_id": seq_id, "output": out_name, "horizon": horizon,
            "feature_names": data["feature_names"],
            "rows": table, "summary": summary}
