"""``lathe compare RUN_A RUN_B``: are two runs the same? Per-step loss and gradient-norm
differences as a table (and, with ``--output``, a plot), and an exit code a script (or the test
suite) can use.

* What is compared by default: ``step_loss`` (the loss of the logged step itself) and ``grad_norm``,
  both values of one step, so a run preempted and resumed from a checkpoint compares equal to an
  uninterrupted one when its steps are. The window average ``loss`` differs after a resume (the
  first window after it is shorter): asked for, steps whose windows differ (``loss_steps``) are
  left out and counted. Runs written before ``step_loss`` existed are compared on ``loss``.
* A folder holding several runs (a new run started in an old run's folder) is compared by its
  latest run, and the summary says so.

* A value pair agrees when ``|a - b| <= rtol * max(|a|, |b|)`` (``--rtol``, default 1e-6: a few
  float32 roundings; ``--rtol 0`` demands bitwise equality). Two non-finite values (null in
  ``metrics.jsonl``) agree with each other, not with a number.
* Exit code 0: every step both runs logged agrees, for every compared metric; 1: some differ (the
  first such step is named); 2: a run folder or its metrics are missing.
* ``--assert-equal`` also requires both runs to have logged the same steps (a shorter replay, or a
  run that stopped early, fails), and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lathe.errors import ConfigError
from lathe.metrics.history import RunHistory, _labels, read_runs

DEFAULT_METRICS = ("step_loss", "grad_norm")
WINDOWED = {"loss", "max_loss"}  # averaged over the window since the last log step: loss_steps of them
MAX_ROWS = 40  # longer tables show their first and last rows, and every differing row


def rel_diff(a: float | None, b: float | None) -> float:
    """0 for equal values (both non-finite counts as equal), inf for a number against a non-finite."""
    fa = a is not None and math.isfinite(a)
    fb = b is not None and math.isfinite(b)
    if not fa or not fb:
        return 0.0 if fa == fb else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


@dataclass
class Comparison:
    a: RunHistory
    b: RunHistory
    metrics: list[str]
    rtol: float
    steps: list[int] = field(default_factory=list)  # steps both logged (of the first metric)
    only_a: list[int] = field(default_factory=list)
    only_b: list[int] = field(default_factory=list)
    max_diff: dict[str, float] = field(default_factory=dict)
    first_bad: dict[str, int] = field(default_factory=dict)  # metric -> first step beyond rtol
    uncomparable: dict[str, list[int]] = field(default_factory=dict)  # metric -> steps whose windows differ
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.first_bad


def compare_runs(run_a: str, run_b: str, metrics: list[str] | None = None, rtol: float = 1e-6) -> Comparison:
    """Compare two run folders' metrics step by step."""
    if not rtol >= 0:
        raise ConfigError("--rtol", "must be >= 0", "e.g. 1e-6, or 0 for bitwise equality", rtol)
    runs = [read_runs(run_a), read_runs(run_b)]
    labels = _labels([run_a, run_b])
    a, b = runs[0][-1], runs[1][-1]
    notes = []
    for name, found, label in (("A", runs[0], labels[0]), ("B", runs[1], labels[1])):
        found[-1].label = label
        if len(found) > 1:
            notes.append(f"{name} holds {len(found)} runs; comparing its latest" +
                         (f" (run_id {found[-1].run_id})" if found[-1].run_id else ""))
    asked = list(metrics or DEFAULT_METRICS)
    if metrics is None and not ("step_loss" in a.series and "step_loss" in b.series):
        asked = ["loss", "grad_norm"]  # written before step_loss was logged
        notes.append("no step_loss in both runs (older lathe): comparing the window-average loss")
    wanted = [m for m in asked if m in a.series or m in b.series]
    if not wanted:
        raise ConfigError("--metrics", f"neither run logged {', '.join(asked)}",
                          "train at least one log step first", ",".join(asked))
    cmp = Comparison(a, b, wanted, rtol, notes=notes)
    first = wanted[0]
    sa, sb = set(a.series.get(first, {})), set(b.series.get(first, {}))
    cmp.steps, cmp.only_a, cmp.only_b = sorted(sa & sb), sorted(sa - sb), sorted(sb - sa)
    wa, wb = a.series.get("loss_steps", {}), b.series.get("loss_steps", {})
    for m in wanted:
        va, vb = a.series.get(m, {}), b.series.get(m, {})
        worst = 0.0
        for step in sorted(set(va) & set(vb)):
            if m in WINDOWED and step in wa and step in wb and wa[step] != wb[step]:  # a resume cut one short
                cmp.uncomparable.setdefault(m, []).append(step)
                continue
            d = rel_diff(va[step], vb[step])
            worst = max(worst, d)
            if d > rtol and m not in cmp.first_bad:
                cmp.first_bad[m] = step
        if m not in a.series or m not in b.series:
            cmp.first_bad.setdefault(m, -1)  # logged by one run only
        cmp.max_diff[m] = worst
    return cmp


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.6g}"


def format_table(cmp: Comparison) -> str:
    """The per-step table: each metric's value in both runs and their relative difference."""
    head = ["step"]
    for m in cmp.metrics:
        head += [f"{m} A", f"{m} B", "rel diff"]
    rows = []
    for step in cmp.steps:
        row = [str(step)]
        bad = False
        for m in cmp.metrics:
            va, vb = cmp.a.series.get(m, {}).get(step), cmp.b.series.get(m, {}).get(step)
            if step in cmp.uncomparable.get(m, ()):
                row += [_fmt(va), _fmt(vb), "window"]
                continue
            d = rel_diff(va, vb)
            bad |= d > cmp.rtol
            row += [_fmt(va), _fmt(vb), "-" if d == 0 else f"{d:.2e}" + (" *" if d > cmp.rtol else "")]
        rows.append((row, bad))
    if len(rows) > MAX_ROWS:
        keep = set(range(10)) | set(range(len(rows) - 10, len(rows))) | {i for i, (_, bad) in enumerate(rows) if bad}
        shown, last = [], -1
        for i in sorted(keep)[: MAX_ROWS * 2]:
            if i != last + 1:
                shown.append((["..."] + [""] * (len(head) - 1), False))
            shown.append(rows[i])
            last = i
        rows = shown
    table = [head] + [r for r, _ in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(cmp: Comparison, assert_equal: bool) -> tuple[str, int]:
    """The verdict lines and the exit code."""
    lines = [f"A = {cmp.a.path}", f"B = {cmp.b.path}", *cmp.notes,
             f"{len(cmp.steps)} steps logged by both (rtol {cmp.rtol:g}; * = beyond it)"]
    for m in cmp.metrics:
        bad = cmp.first_bad.get(m)
        if bad == -1:
            lines.append(f"{m}: logged by one run only")
        else:
            lines.append(f"{m}: max rel diff {cmp.max_diff[m]:.3g}" + (f", first beyond rtol at step {bad}" if bad else ""))
        if cmp.uncomparable.get(m):
            lines.append(f"{m}: {len(cmp.uncomparable[m])} steps not compared, their averaging windows differ "
                         f"(a resume cut one short: {_steps(cmp.uncomparable[m])}); step_loss compares every step")
    code = 0 if cmp.equal else 1
    if cmp.only_a or cmp.only_b:
        missing = f"steps only in A: {_steps(cmp.only_a)}; only in B: {_steps(cmp.only_b)}"
        lines.append(missing)
        if assert_equal:
            code = 1
    if not cmp.steps:
        code = 1
        lines.append("no step was logged by both runs")
    lines.append("SAME: the runs agree" if code == 0 else "DIFFERENT: the runs do not agree")
    return "\n".join(lines), code


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[:8])) + (f", ... ({len(steps)} in all)" if len(steps) > 8 else "")


def plot_comparison(cmp: Comparison, output: str | Path) -> Path:
    """Both runs' curves per metric (top) and their relative difference per step (bottom)."""
    from lathe.metrics.plot import _import_matplotlib

    Figure, _ = _import_matplotlib()
    output = Path(output)
    n = len(cmp.metrics)
    fig = Figure(figsize=(6.4 * n, 6.4), dpi=110, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i, m in enumerate(cmp.metrics):
        top, bottom = axes[0][i], axes[1][i]
        for run, color, style in ((cmp.a, "C0", "-"), (cmp.b, "C1", "--")):
            steps, ys = run.values(m)
            top.plot(steps, ys, style, color=color, linewidth=1.6, label=f"{'A' if run is cmp.a else 'B'}: {run.label}")
        top.set_title(m, fontsize=11)
        top.set_xlabel("step")
        top.set_ylabel(m)
        top.grid(True, alpha=0.3)
        top.legend(fontsize=8)
        va, vb = cmp.a.series.get(m, {}), cmp.b.series.get(m, {})
        steps = sorted(set(va) & set(vb))
        diffs = [rel_diff(va[s], vb[s]) for s in steps]
        shown = [d if math.isfinite(d) else 1.0 for d in diffs]
        bottom.plot(steps, shown, marker=".", color="C3", linewidth=1.0)
        if cmp.rtol > 0:
            bottom.axhline(cmp.rtol, color="gray", linestyle=":", label=f"rtol {cmp.rtol:g}")
            bottom.legend(fontsize=8)
        if any(d > 0 for d in shown):
            bottom.set_yscale("symlog", linthresh=max(cmp.rtol, 1e-9))
            bottom.set_ylim(bottom=0)
        bottom.set_title(f"{m}: relative difference |A - B| / max(|A|, |B|)", fontsize=10)
        bottom.set_xlabel("step")
        bottom.grid(True, alpha=0.3)
    fig.suptitle(f"lathe compare: A = {cmp.a.label}, B = {cmp.b.label}", fontsize=12)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format=output.suffix.lower().lstrip(".") or "png")
    return output
