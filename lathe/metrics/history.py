"""Reading a run folder's ``metrics.jsonl`` back: what ``lathe plot`` and ``lathe compare`` work from.

Every record carries ``run_id`` (one per run: a run resumed from its checkpoint keeps it) and
``attempt`` (one per start of ``lathe train``). A folder may hold several runs (a new run started in
an old run's folder appends to the same file): they are read apart, one :class:`RunHistory` each, in
the order they started. Within a run, for a step logged more than once (a resume, a rollback that
replays steps) the last record wins, which is the value the run finally continued from. Event
records (``{"event": ...}``) are kept apart.

Files written before run ids existed are split where a ``start`` event is followed by step 1 again
(a fresh run; a resume continues past its checkpoint's step instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunHistory:
    """The metrics of one run: ``series[name][step] = value`` (None for a non-finite value)."""

    path: Path
    label: str
    series: dict[str, dict[int, float | None]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""  # "" for records written before run ids
    attempts: list[str] = field(default_factory=list)  # the starts of this run, in order

    def steps(self, name: str) -> list[int]:
        return sorted(self.series.get(name, {}))

    def values(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``name`` in step order; None (non-finite) becomes NaN."""
        s = self.series.get(name, {})
        steps = sorted(s)
        return steps, [math.nan if s[k] is None else float(s[k]) for k in steps]

    @property
    def start(self) -> dict[str, Any]:
        """The last ``start`` record (device, peak FLOPs, ...), or {}."""
        starts = [e for e in self.events if e.get("event") == "start"]
        return starts[-1] if starts else {}


def metrics_file(run: str | Path) -> Path:
    """``run``'s metrics.jsonl: ``run`` is a run folder or the file itself."""
    p = Path(run)
    f = p / METRICS_FILE if p.is_dir() else p
    if not f.is_file():
        raise ConfigError("RUN_DIR", f"no {METRICS_FILE} in {run}",
                          "point it at the job.dump_folder of a lathe run (or at its metrics.jsonl)", str(run))
    return f


def _records(f: Path):
    """The file's JSON objects; a line cut short by a crash is skipped. Not UTF-8 (lathe writes
    ASCII JSON): not a lathe metrics file, said in one line."""
    with open(f, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(str(f), f"line {number} is not UTF-8 text, so this is not a metrics.jsonl "
                                  "lathe wrote", "point lathe at a run folder (job.dump_folder) or its metrics.jsonl") from None
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def read_runs(run: str | Path, label: str | None = None) -> list[RunHistory]:
    """Every run in ``run``'s metrics.jsonl, in the order they started."""
    f = metrics_file(run)
    base = label or f.parent.name
    runs: dict[str, RunHistory] = {}
    legacy_part, legacy_start = 0, None  # before run ids: the last start event not yet followed by a step
    for rec in _records(f):
        run_id = rec.get("run_id")
        if isinstance(run_id, str) and run_id:
            key = run_id
        else:
            run_id, key = "", f"#{legacy_part}"
            current = runs.get(key)
            if rec.get("step") == 1 and legacy_start is not None and current is not None and current.series:
                legacy_part, key = legacy_part + 1, f"#{legacy_part + 1}"  # a fresh run, not a resume
                current.events.remove(legacy_start)
                runs[key] = RunHistory(path=f.parent, label=base, events=[legacy_start])
            if "step" in rec and "event" not in rec:
                legacy_start = None
        history = runs.get(key)
        if history is None:
            history = runs[key] = RunHistory(path=f.parent, label=base, run_id=run_id)
        if not run_id and rec.get("event") == "start":
            legacy_start = rec
        attempt = rec.get("attempt")
        if isinstance(attempt, str) and attempt not in history.attempts:
            history.attempts.append(attempt)
        if "event" in rec:
            history.events.append(rec)
            continue
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for name, value in rec.items():
            if name in ("step", "time") or not (value is None or isinstance(value, (int, float))):
                continue
            if isinstance(value, bool):
                continue
            history.series.setdefault(name, {})[step] = value
    out = [h for h in runs.values() if h.series or h.events] or [RunHistory(path=f.parent, label=base)]
    if len(out) > 1:
        for i, h in enumerate(out, 1):
            h.label = f"{base} run {i}" + (f" ({h.run_id[:8]})" if h.run_id else "")
    return out


def read_history(run: str | Path, label: str | None = None) -> RunHistory:
    """The latest run in ``run``'s metrics.jsonl (the one a folder's last ``lathe train`` wrote)."""
    return read_runs(run, label)[-1]


def _labels(runs: list[str]) -> list[str]:
    paths = [metrics_file(r).parent for r in runs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def read_histories(runs: list[str], latest_only: bool = False) -> list[RunHistory]:
    """Every run of several folders (or only each folder's latest), labelled by folder name (with
    the parent folder when names repeat, and the run's number when a folder holds several)."""
    out = []
    for r, label in zip(runs, _labels(runs)):
        found = read_runs(r, label)
        out += found[-1:] if latest_only else found
    return out
