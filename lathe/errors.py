"""The one exception type users see for bad input.

A ``ConfigError`` names the option, the bad value and the fix. The CLI prints it as one line,
without a traceback, and exits with code 2 — before any process group or model exists.
"""

from __future__ import annotations

from typing import Any

_UNSET = object()


class ConfigError(ValueError):
    """Bad configuration or input, explained for a person."""

    def __init__(self, option: str, problem: str, fix: str = "", value: Any = _UNSET):
        self.option, self.problem, self.fix, self.value = option, problem, fix, value
        shown = option if value is _UNSET else f"{option}={value!r}"
        message = f"{shown}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
