"""``lathe plot``: loss curves (and learning rate, gradient norm, wps, MFU) of one or several runs,
from their ``metrics.jsonl``, drawn with matplotlib (optional: ``pip install 'lathe[plot]'``).

One panel per metric, runs overlaid in distinct colours and named in the legend (a folder holding
several runs, as when a new run started in an old run's folder, gives one curve per run; the starts of
one resumed run are one curve); each curve is drawn
raw (thin, faint) and smoothed (an exponential moving average, debiased like TensorBoard's); the
validation loss is drawn as dots on the loss panel. The x axis is steps or global tokens. Scales:
a loss or gradient norm spanning more than a factor of 20 gets a log axis; throughput axes start at 0
and leave out the first log window (start-up and compilation).
PNG or SVG by the output's extension.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lathe.errors import ConfigError
from lathe.metrics.history import RunHistory, read_histories

logger = logging.getLogger("lathe")

DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "wps", "mfu")
TITLES = {
    "loss": "training loss",
    "val_loss": "validation loss",
    "max_loss": "max loss over data-parallel ranks",
    "lr": "learning rate",
    "grad_norm": "gradient norm (before clipping)",
    "wps": "wps (tokens/s per device)",
    "mfu": "MFU (%), attention counted S x S",
    "mfu_causal": "MFU (%), causal attention",
    "memory_gib": "peak memory (GiB)",
    "step_time": "step time (s)",
    "val_perplexity": "validation perplexity",
}
LOG_SPAN = 20.0  # a loss or gradient norm whose max/min exceeds this gets a log axis
LOG_METRICS = {"loss", "max_loss", "val_loss", "grad_norm", "val_perplexity"}
EXACT = {"lr"}  # not noisy: never smoothed
THROUGHPUT = {"wps", "mfu", "mfu_causal", "step_time"}  # the first log window holds warm-up: not in the y range
MIN_POINTS_TO_SMOOTH = 20


def _import_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("lathe plot", "needs matplotlib, which is not installed",
                          "pip install 'lathe[plot]' (or: pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)  # files only: no display needed
    from matplotlib.figure import Figure
    from matplotlib import ticker

    return Figure, ticker


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled to 0);
    NaN values are passed through and do not disturb the average."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _x(run: RunHistory, steps: list[int], x_axis: str) -> list[float]:
    if x_axis == "steps":
        return list(map(float, steps))
    tokens = run.series.get("tokens_seen", {})
    known = sorted(tokens)
    out = []
    for s in steps:  # validation steps may fall between logged training steps: interpolate per step
        if s in tokens and tokens[s] is not None:
            out.append(float(tokens[s]))
            continue
        below = [k for k in known if k <= s and tokens[k]]
        if below:
            k = below[-1]
            out.append(float(tokens[k]) / k * s)
        else:
            out.append(math.nan)
    return out


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def plot_runs(runs: list[str], output: str | Path, metrics: list[str] | None = None, x_axis: str = "steps",
              smooth: float = 0.6, latest_only: bool = False) -> Path:
    """Draw ``metrics`` of ``runs`` (run folders) into ``output`` (.png or .svg); returns its path.
    ``latest_only``: of each folder, only the run its last ``lathe train`` wrote."""
    if x_axis not in ("steps", "tokens"):
        raise ConfigError("--x", "must be steps or tokens", "e.g. --x tokens", x_axis)
    if not 0 <= smooth < 1:
        raise ConfigError("--smooth", "must be in [0, 1)", "0 = raw only, 0.6 = the default, 0.9 = smoother", smooth)
    output = Path(output)
    if output.suffix.lower() not in (".png", ".svg"):
        raise ConfigError("--output", "must end in .png or .svg", "e.g. --output loss.png", str(output))
    Figure, ticker = _import_matplotlib()
    histories = read_histories(runs, latest_only)
    wanted = list(metrics or DEFAULT_METRICS)
    # The validation loss joins the loss panel when both are asked for.
    val_on_loss = "loss" in wanted and "val_loss" in wanted
    panels = []
    for m in dict.fromkeys(wanted):
        if m == "val_loss" and val_on_loss:
            continue
        logged = any(h.series.get(m) for h in histories)
        if logged or (m == "loss" and val_on_loss and any(h.series.get("val_loss") for h in histories)):
            panels.append(m)
    if not panels:
        have = sorted({k for h in histories for k in h.series})
        raise ConfigError("--metrics", f"none of {', '.join(wanted)} was logged by these runs",
                          f"logged: {', '.join(have) or 'nothing yet'}", ",".join(wanted))

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.8 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for ax, metric in zip(axes, panels):
        ys_all: list[float] = []
        has_val = False
        for run, color in zip(histories, colors):
            steps, ys = run.values(metric)
            if steps:
                xs = _x(run, steps, x_axis)
                smoothed = smooth > 0 and len(steps) >= MIN_POINTS_TO_SMOOTH and metric not in EXACT
                ax.plot(xs, ys, color=color, linewidth=0.9 if smoothed else 1.6, alpha=0.35 if smoothed else 1.0,
                        label=None if smoothed else run.label)
                if smoothed:
                    ax.plot(xs, ema(ys, smooth), color=color, linewidth=1.8, label=run.label)
                ys_all += _finite(ys[1:] if metric in THROUGHPUT and len(ys) > 2 else ys)
            if metric == "loss" and val_on_loss:
                vsteps, vys = run.values("val_loss")
                if vsteps:
                    has_val = True
                    ax.plot(_x(run, vsteps, x_axis), vys, linestyle="none", marker="o", markersize=5, color=color,
                            markeredgecolor="black", markeredgewidth=0.6,
                            label=f"{run.label} (validation)")
                    ys_all += _finite(vys)
        title = TITLES.get(metric, metric)
        if metric == "loss" and has_val:
            title = "loss: training (lines), validation (dots)"
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step" if x_axis == "steps" else "tokens (global)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        positive = [v for v in ys_all if v > 0]
        if (metric in LOG_METRICS and positive and len(positive) == len(ys_all)
                and max(positive) / min(positive) > LOG_SPAN):
            ax.set_yscale("log")
        elif metric in THROUGHPUT and ys_all:
            ax.set_ylim(0, max(ys_all) * 1.15)
            if metric == "wps":
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        elif metric == "lr":
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter(useMathText=True))
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if x_axis == "tokens":
            ax.xaxis.set_major_formatter(ticker.EngFormatter())
        if ax is axes[0] or has_val:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    names = ", ".join(h.label for h in histories)
    fig.suptitle(f"lathe runs: {names}" if len(histories) > 1 else f"lathe run: {names}", fontsize=12)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format=output.suffix.lower().lstrip("."))
    return output


def plot_at_end(dump_folder: Path) -> None:
    """``metrics.plot_at_end``: ``{dump_folder}/metrics.png`` of this run; a failure only warns."""
    try:
        path = plot_runs([str(dump_folder)], Path(dump_folder) / "metrics.png", latest_only=True)
        logger.info("plot of the run's metrics: %s", path)
    except (ConfigError, OSError, ValueError) as e:
        logger.warning("could not plot the run's metrics: %s", e)
