"""A compact progress line for long work that is not training (building the corpus, preparing data):

    corpus: [#######.............] 36% 610/1,690 files  41/s  elapsed 15s  eta 26s

It goes through lathe's logger like every other line (so it lands in the same place, with the same
timestamps, under torchrun's rank prefixes too): one line when the work has run ``first_s`` seconds,
then at most one every ``every_s`` seconds, and a closing line if any was printed. Work that ends
quickly prints nothing.
"""

from __future__ import annotations

import logging
import time

from lathe.metrics.console import format_duration

logger = logging.getLogger("lathe")

WIDTH = 20


def format_progress(what: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        frac = min(done / total, 1.0)
        bar = "#" * round(frac * WIDTH) + "." * (WIDTH - round(frac * WIDTH))
        eta = (total - done) / rate if rate > 0 else None
        text = f"{what}: [{bar}] {frac:4.0%} {done:,}/{total:,} {unit}"
    else:
        text, eta = f"{what}: {done:,} {unit}", None
    text += f"  {rate:,.0f}/s  elapsed {format_duration(elapsed)}"
    return text + (f"  eta {format_duration(eta)}" if eta is not None and done < (total or 0) else "")


class Progress:
    """``with Progress("corpus", total=n, unit="files") as p: ... p.update()``"""

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every_s: float = 10.0,
                 first_s: float = 3.0, log=None):
        self.what, self.total, self.unit = what, total, unit
        self.every_s, self.first_s = every_s, first_s
        self.log = log or logger.info
        self.done = 0
        self.start = time.monotonic()
        self.last_print: float | None = None

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        due = now - self.start >= self.first_s if self.last_print is None else now - self.last_print >= self.every_s
        if due:
            self.last_print = now
            self.log(format_progress(self.what, self.done, self.total, self.unit, now - self.start))

    def close(self) -> None:
        if self.last_print is not None:  # only if the work was long enough to show progress at all
            self.log(format_progress(self.what, self.done, self.total, self.unit, time.monotonic() - self.start)
                     + "  done")
            self.last_print = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
