"""The one-line progress report printed every log step."""

from __future__ import annotations

from collections.abc import Mapping

# ANSI escape codes (bright variants: plain blue is hard to read on dark terminals).
_CYAN, _GREEN, _YELLOW, _BLUE, _MAGENTA = "\033[96m", "\033[92m", "\033[93m", "\033[94m", "\033[95m"
_DIM, _RESET = "\033[2m", "\033[0m"


def format_console_line(
    *,
    step: int,
    loss: float,
    memory_gib: float,
    memory_pct: float,
    wps: float,
    mfu: float,
    color: bool = False,
    tokens_seen: int | None = None,
    lr: float | None = None,
    grad_norm: float | None = None,
    step_time: float | None = None,
    data_loading_pct: float | None = None,
    elapsed: float | None = None,
    eta: float | None = None,
    counters: Mapping[str, int] | None = None,
) -> str:
    """The one-line progress report, in the shape torchtitan users know::

        step: 10  loss:  7.1234  memory:  0.52GiB(2.14%)  wps: 1,710  mfu: 3.50%  | tokens(global): ...

    ``wps`` and ``memory`` are per device; ``tokens(global)`` counts every data-parallel rank.
    The part after ``|`` holds the optional extras (only those given), dimmed when ``color``:
    tokens, learning rate, gradient norm, step time, data-loading share, time since the start of
    this process (``elapsed``), the estimated time to the last step (``eta``) and, once any step
    was skipped, the counters of skipped steps (``skipped: 2 (non-finite 1, spike 1)``).
    """
    parts = [
        (_CYAN, f"step: {step:2}"),
        (_GREEN, f"loss: {loss:7.4f}"),
        (_YELLOW, f"memory: {memory_gib:5.2f}GiB({memory_pct:.2f}%)"),
        (_BLUE, f"wps: {round(wps):,}"),
        (_MAGENTA, f"mfu: {mfu:.2f}%"),
    ]
    line = "  ".join(f"{c}{text}{_RESET}" if color else text for c, text in parts)

    shown = (("tokens(global): {:,}", tokens_seen), ("lr: {:.3e}", lr), ("gnorm: {:.4f}", grad_norm),
             ("step_time: {:.2f}s", step_time), ("data: {:.1f}%", data_loading_pct))
    extras = [fmt.format(value) for fmt, value in shown if value is not None]
    extras += [f"{name}: {format_duration(value)}" for name, value in (("elapsed", elapsed), ("eta", eta))
               if value is not None]
    if counters and counters.get("skipped_steps"):
        why = [f"{name} {counters.get(key, 0)}" for name, key in
               (("non-finite", "nonfinite_steps"), ("spike", "spike_steps")) if counters.get(key)]
        extras.append(f"skipped: {counters['skipped_steps']}" + (f" ({', '.join(why)})" if why else ""))
    if counters and counters.get("rollbacks"):
        extras.append(f"rollbacks: {counters['rollbacks']}")
    if extras:
        tail = "| " + "  ".join(extras)
        line += "  " + (f"{_DIM}{tail}{_RESET}" if color else tail)
    return line



def format_duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``3h02m``, ``2d04h``: compact, and exact enough for a progress line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
