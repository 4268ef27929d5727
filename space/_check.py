"""Small validators shared by the value types of this package.

They exist so that every invalid value is reported the same way: a
``ValueError`` that says what was wrong and what would have been accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def is_int(value: object) -> bool:
    """True for real integers; ``bool`` is excluded because ``True == 1``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int within [minimum, maximum], else raise."""
    accepted = _range_text(minimum, maximum)
    if not is_int(value):
        raise ValueError(f"{name} must be an integer {accepted}; got {value!r}")
    assert isinstance(value, int)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {accepted}; got {value!r}")
    return value


def check_choice(name: str, value: object, accepted: tuple[object, ...]) -> None:
    """Raise unless ``value`` is one of ``accepted`` (ints must be real ints)."""
    ok = any(_same(value, a) for a in accepted)
    if not ok:
        listed = ", ".join("None" if a is None else str(a) for a in accepted)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")


def check_float(name: str, value: object, *, accepted: str) -> float:
    """Return ``value`` as a finite float, else raise naming ``accepted``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number {accepted}; got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a number {accepted}; got {value!r}")
    return result


def coerce_enum(enum_type: type[E], name: str, value: object) -> E:
    """Accept an enum member or its value; anything else is an error."""
    try:
        return enum_type(value)
    except ValueError:
        listed = ", ".join(repr(m.value) for m in enum_type)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}") from None


def check_keys(what: str, data: object, accepted: tuple[str, ...]) -> dict[str, object]:
    """Check that ``data`` is a str-keyed mapping using only ``accepted`` keys."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object (mapping); got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in accepted)
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(unknown)}; accepted keys: {', '.join(accepted)}")
    return dict(data)


def _same(value: object, accepted: object) -> bool:
    if accepted is None:
        return value is None
    if isinstance(accepted, int) and not is_int(value):
        return False
    return value == accepted


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""
