"""Memory budgets, given either in bytes or as a fraction of the dense model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction

from ._check import check_float, coerce_enum


class BudgetKind(StrEnum):
    BYTES = "bytes"
    FRACTION = "fraction"


_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Beyond any real device; also keeps float conversion of the result exact enough.
_MAX_BYTES = 2**60
# Exponent digits are capped so that "1e999999999" cannot stall Fraction().
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?"
_PATTERN = re.compile(rf"\s*({_NUMBER})\s*(%|[A-Za-z]+)?\s*")
_ACCEPTED = (
    "a percentage of the dense model in (0, 100] like '40%' or '12.5 %', "
    "a byte count > 1 like '123456' or '1.5e9', or a size with a unit "
    "(B, kB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024) "
    "like '6GiB', '6 GiB' or '300MB'"
)
_BINARY_NAMES = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """A memory budget: ``value`` bytes, or ``value`` times the dense size."""

    kind: BudgetKind
    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", coerce_enum(BudgetKind, "kind", self.kind))
        if self.kind is BudgetKind.FRACTION:
            value = check_float("value", self.value, accepted="in (0, 1] for a fraction budget")
            if not 0.0 < value <= 1.0:
                raise ValueError(f"fraction budget value must be in (0, 1]; got {self.value!r}")
        else:
            accepted = f"a whole number of bytes in [1, {_MAX_BYTES}]"
            value = check_float("value", self.value, accepted=accepted)
            if not (1.0 <= value <= _MAX_BYTES and value.is_integer()):
                raise ValueError(f"byte budget value must be {accepted}; got {self.value!r}")
        object.__setattr__(self, "value", value)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"40%"``, ``"1.5e9"``, ``"6GiB"``, ``"300MB"`` and the like."""
        match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise _bad(text, "it is not a number with an optional unit")
        number, unit = Fraction(match.group(1)), match.group(2)
        if unit == "%":
            if not 0 < number <= 100:
                raise _bad(text, "a percentage must be in (0, 100]")
            return cls(kind=BudgetKind.FRACTION, value=float(number / 100))
        if unit is None and number <= 1:
            percent = _decimal_text(number * 100) if number > 0 else "40"
            raise _bad(
                text,
                "a plain number is a byte count and must be > 1; for a fraction of "
                f"the dense model write a percentage like '{percent}%'",
            )
        multiplier = 1 if unit is None else _UNITS.get(unit.lower())
        if multiplier is None:
            raise _bad(text, f"unknown unit {unit!r}")
        n_bytes = math.floor(number * multiplier)
        if not 1 <= n_bytes <= _MAX_BYTES:
            raise _bad(text, f"a byte budget must be between 1 byte and {_MAX_BYTES} bytes")
        return cls(kind=BudgetKind.BYTES, value=float(n_bytes))

    def resolve(self, dense_bytes: int) -> int:
        """The budget in bytes for a model whose dense size is ``dense_bytes``."""
        if self.kind is BudgetKind.BYTES:
            return int(self.value)
        # Going through repr avoids float error: 0.29 * 100 is 28.999999999999996.
        return math.floor(Fraction(repr(self.value)) * dense_bytes)

    def __str__(self) -> str:
        if self.kind is BudgetKind.FRACTION:
            return f"{_decimal_text(Fraction(repr(self.value)) * 100)}%"
        n_bytes = int(self.value)
        for name, size in _BINARY_NAMES:
            if n_bytes % size == 0:
                return f"{n_bytes // size}{name}"
        return f"{n_bytes}B"


def _decimal_text(number: Fraction) -> str:
    """Plain decimal text for a fraction with a terminating decimal expansion."""
    exact = Decimal(number.numerator) / Decimal(number.denominator)
    return format(exact.normalize(), "f")


def _bad(text: object, reason: str) -> ValueError:
    return ValueError(f"cannot parse budget {text!r}: {reason}; accepted: {_ACCEPTED}")
