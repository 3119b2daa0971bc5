"""The one-line progress report printed every log step."""

from __future__ import annotations

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
) -> str:
    """The one-line progress report, in the shape torchtitan users know::

        step: 10  loss:  7.1234  memory:  0.52GiB(2.14%)  wps: 1,710  mfu: 3.50%  | tokens: ...

    The part after ``|`` holds the optional extras (only those given), dimmed when ``color``.
    """
    parts = [
        (_CYAN, f"step: {step:2}"),
        (_GREEN, f"loss: {loss:7.4f}"),
        (_YELLOW, f"memory: {memory_gib:5.2f}GiB({memory_pct:.2f}%)"),
        (_BLUE, f"wps: {round(wps):,}"),
        (_MAGENTA, f"mfu: {mfu:.2f}%"),
    ]
    line = "  ".join(f"{c}{text}{_RESET}" if color else text for c, text in parts)

    extras = []
    if tokens_seen is not None:
        extras.append(f"tokens: {tokens_seen:,}")
    if lr is not None:
        extras.append(f"lr: {lr:.3e}")
    if grad_norm is not None:
        extras.append(f"gnorm: {grad_norm:.4f}")
    if step_time is not None:
        extras.append(f"step_time: {step_time:.2f}s")
    if data_loading_pct is not None:
        extras.append(f"data: {data_loading_pct:.1f}%")
    if extras:
        tail = "| " + "  ".join(extras)
        line += "  " + (f"{_DIM}{tail}{_RESET}" if color else tail)
    return line

