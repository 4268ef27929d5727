"""The inference workload a plan is sized for: batch size and context length."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._check import check_int

MAX_BATCH = 4096
MAX_CONTEXT = 1_048_576

_FORM = "'batch=<int>,context=<int>' (both optional, any order), e.g. 'batch=1,context=2048'"
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Batch rows decoded together and tokens of context held per row."""

    batch: int = 1
    context: int = 512

    def __post_init__(self) -> None:
        check_int("batch", self.batch, minimum=1, maximum=MAX_BATCH)
        check_int("context", self.context, minimum=1, maximum=MAX_CONTEXT)

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Parse ``"batch=1,context=2048"``; omitted keys take their defaults."""
        if not isinstance(text, str):
            raise ValueError(f"workload must be a string of the form {_FORM}; got {text!r}")
        values: dict[str, int] = {}
        parts = text.split(",") if text.strip() else []
        for part in parts:
            name, value = _parse_part(text, part)
            if name in values:
                raise ValueError(f"workload {text!r} sets {name!r} twice; accepted form: {_FORM}")
            values[name] = value
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"workload {text!r}: {err}") from None

    def __str__(self) -> str:
        return f"batch={self.batch},context={self.context}"


def _parse_part(text: str, part: str) -> tuple[str, int]:
    name, sep, value = (s.strip() for s in part.partition("="))
    if not sep or name not in ("batch", "context"):
        raise ValueError(f"workload {text!r} has an unrecognised item {part.strip()!r}; accepted form: {_FORM}")
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"workload {text!r}: {name} must be a whole number; got {value!r}; accepted form: {_FORM}")
    return name, int(value)
