"""Checks for method and policy options (the extra keyword arguments of `verispec.generate`), shared by the
drafter and policy files.

Impossible values end in a ValueError that names the option, the allowed range and the value received.
"""

from __future__ import annotations

from collections.abc import Iterable


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """Return `value` if it is an int in [minimum, maximum] (bool is not an int here), else raise ValueError."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_known(options: dict, method: str, known: Iterable[str]) -> dict:
    """Reject option names the method does not take (a typo would otherwise be ignored silently)."""
    known = tuple(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
                         f"known: {', '.join(known) or 'none'}")
    return options


def check_unit(name: str, v, lo_open: bool = False, hi_open: bool = False) -> float:
    """Return float(v) if it lies in the unit interval [0, 1] (ends opened as asked), else raise ValueError."""
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v if lo_open else 0 <= v)
          and (v < 1 if hi_open else v <= 1))
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, got {v!r}")
    return float(v)
