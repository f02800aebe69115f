"""forecast.png: the forecaster against the actual values over the test split."""
from __future__ import annotations

import logging

import numpy as np

from rnnserve.timeseries import to_datetime
from rnnserve.train.forecast_data import Series

log = logging.getLogger(__name__)


ZOOM_STEPS = 168  # the second panel: the last week of hourly data (or 168 days)


def _panel(ax, series: Series, whole: np.ndarray, horizon: int, xs, lo: int, n: int) -> None:
    if series.head == "regression":
        ax.plot(xs[lo:n], series.target[lo:n], color="black", linewidth=1.2, label="actual")
        ax.plot(xs[lo:n], whole[lo - 1:n - 1, 0], linewidth=0.9, label="forecast 1 step ahead")
        if horizon > 1:
            ax.plot(xs[lo + horizon - 1:n], whole[lo - 1:n - horizon, horizon - 1], linewidth=0.9, alpha=0.8,
                    label=f"forecast {horizon} steps ahead")
        ax.set_ylabel(series.target_name)
    else:
        ax.step(xs[lo:n], series.target[lo:n], where="mid", color="black", label="actual")
        ax.step(xs[lo:n], whole[lo - 1:n - 1].argmax(-1) + 0.08, where="mid", alpha=0.8,
                label="forecast (next step)")
        ax.set_yticks(range(len(series.class_names)), series.class_names)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def plot_forecast(series: Series, whole: np.ndarray, horizon: int, path: str) -> None:
    """Regression: the actual target, the 1-step forecast and the H-step forecast, each placed at the time
    it forecasts. Classification: the actual class and the predicted next-step class."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    b1, n = series.split("test")
    xs = ([to_datetime(t) for t in series.time] if series.time is not None
          else list(range(len(series.target))))
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5))
    zoom = max(b1, n - ZOOM_STEPS)
    for ax, lo, title in ((axes[0], b1, "the whole test split"), (axes[1], zoom, f"its last {n - zoom} steps")):
        _panel(ax, series, whole, horizon, xs, lo, n)
        ax.set_title(f"{series.target_name}: forecast against actual, {title}")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote %s", path)
