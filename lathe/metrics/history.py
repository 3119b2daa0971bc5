"""Reading a run's ``metrics.jsonl`` back: what ``lathe plot`` and ``lathe compare`` work from.

The file is appended to by every start of the run (a resume, a rollback that replays steps): for a
step logged more than once, the last record wins, which is the value the run finally continued
from. Event records (``{"event": ...}``) are kept apart.
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


def read_history(run: str | Path, label: str | None = None) -> RunHistory:
    f = metrics_file(run)
    history = RunHistory(path=f.parent, label=label or f.parent.name)
    with open(f) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(rec, dict):
                continue
            if "event" in rec:
                history.events.append(rec)
                continue
            step = rec.get("step")
            if not isinstance(step, int):
                continue
            for key, value in rec.items():
                if key in ("step", "time") or not (value is None or isinstance(value, (int, float))):
                    continue
                if isinstance(value, bool):
                    continue
                history.series.setdefault(key, {})[step] = value
    return history


def read_histories(runs: list[str]) -> list[RunHistory]:
    """Several runs, labelled by folder name (with the parent folder when names repeat)."""
    paths = [metrics_file(r).parent for r in runs]
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    return [read_history(r, label) for r, label in zip(runs, labels)]
