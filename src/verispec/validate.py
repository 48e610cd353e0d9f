"""Checks for method and policy option values (the extra keyword arguments of `verispec.generate`), shared by the
drafter and policy files; which options exist is the registry's business (`verispec.registry`).

Impossible values end in a ValueError that names the option, the allowed range and the value received.
"""

from __future__ import annotations


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


def check_unit(name: str, v, lo_open: bool = False, hi_open: bool = False) -> float:
    """Return float(v) if it lies in the unit interval [0, 1] (ends opened as asked), else raise ValueError."""
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v if lo_open else 0 <= v)
          and (v < 1 if hi_open else v <= 1))
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def parse_value(v: str):
    """A command-line option value: '3' -> 3, '0.5' -> 0.5, 'true' / 'false' -> bool, anything else the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
