"""Value checks shared by the config, the model's ``config.json`` and the preprocessing steps.

The predicates say whether a value is of a kind; the checks return it in canonical form or raise
:class:`ParamError` (a ``ValueError``) naming the key, the value and what would be valid.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["ParamError", "boolean", "choice", "integer", "is_int", "is_real", "number", "pair"]


class ParamError(ValueError):
    """A bad parameter value; the message names the key (the caller adds where it came from)."""


def is_int(v: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ParamError(f"{key} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ParamError(f"{key} must be in {bounds}, got {value!r}")
    return float(value)


def integer(key: str, value: Any, *, lo: int | None = None) -> int:
    if not is_int(value):
        raise ParamError(f"{key} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ParamError(f"{key} must be >= {lo}, got {value!r}")
    return int(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamError(f"{key} must be true or false, got {value!r}")
    return value


def pair(key: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ParamError(f"{key} must be a pair [min, max], got {value!r}")
    a, b = (number(key, v, lo=lo, hi=hi) for v in value)
    if a > b:
        raise ParamError(f"{key} must be [min, max] with min <= max, got {list(value)!r}")
    return a, b


def choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ParamError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
    return value
