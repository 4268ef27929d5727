"""Per-unit compression settings: what to do to one linear layer or KV cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from ._check import check_choice, check_float, check_int, check_keys, coerce_enum
from ._units import UnitKind


class SparsityPattern(StrEnum):
    NONE = "none"
    UNSTRUCTURED = "unstructured"
    SEMI_2_4 = "2:4"


class EvictionPolicy(StrEnum):
    NONE = "none"
    SINK_WINDOW = "sink_window"
    SNAPKV = "snapkv"


WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
KV_BITS: tuple[int, ...] = (2, 4, 8, 16)
GROUP_SIZES: tuple[int | None, ...] = (32, 64, 128, None)

_LINEAR_KEYS = ("bits", "group_size", "sparsity", "pattern", "rank")
_KV_KEYS = ("bits", "kept_tokens", "policy")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearSetting:
    """How one linear weight is stored: quantization, sparsity or low rank.

    ``group_size=None`` means one quantization group per output row
    (per-channel). Sparsity and rank are mutually exclusive because the
    memory layouts for their combination are not defined.
    """

    bits: int = 16
    group_size: int | None = 128
    sparsity: float = 0.0
    pattern: SparsityPattern = SparsityPattern.NONE
    rank: int | None = None

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, WEIGHT_BITS)
        check_choice("group_size", self.group_size, GROUP_SIZES)
        sparsity = check_float("sparsity", self.sparsity, accepted="in [0, 1)")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1); got {self.sparsity!r}")
        # A plain float everywhere keeps to_json identical for 0 and 0.0.
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "pattern", coerce_enum(SparsityPattern, "pattern", self.pattern))
        if self.rank is not None:
            check_int("rank", self.rank, minimum=1)
        self._check_combination()
        if self.bits == 16:
            # Group size means nothing without quantization; normalising it
            # makes equal storage formats compare (and hash) equal.
            object.__setattr__(self, "group_size", None)

    def _check_combination(self) -> None:
        has_pattern = self.pattern is not SparsityPattern.NONE
        if (self.sparsity > 0.0) != has_pattern:
            raise ValueError(
                "sparsity > 0 requires a pattern ('unstructured' or '2:4') and pattern "
                f"'none' requires sparsity 0; got sparsity={self.sparsity!r}, "
                f"pattern={self.pattern.value!r}"
            )
        if self.pattern is SparsityPattern.SEMI_2_4 and self.sparsity != 0.5:
            raise ValueError(f"pattern '2:4' requires sparsity 0.5; got sparsity={self.sparsity!r}")
        if self.rank is not None and has_pattern:
            raise ValueError(
                "sparsity and rank cannot both be set; use either sparsity (with a "
                f"pattern) or rank; got sparsity={self.sparsity!r}, rank={self.rank!r}"
            )

    @property
    def kind(self) -> UnitKind:
        return UnitKind.LINEAR

    @property
    def is_dense(self) -> bool:
        return self.bits == 16 and self.sparsity == 0.0 and self.rank is None

    def label(self) -> str:
        """Short human-readable form, e.g. ``"4b/g128 s50%unstructured"``."""
        if self.bits == 16:
            text = "16b"
        elif self.group_size is None:
            text = f"{self.bits}b/ch"
        else:
            text = f"{self.bits}b/g{self.group_size}"
        if self.pattern is not SparsityPattern.NONE:
            text += f" s{self.sparsity * 100:g}%{self.pattern.value}"
        if self.rank is not None:
            text += f" r{self.rank}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "sparsity": self.sparsity,
            "pattern": self.pattern.value,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearSetting:
        """Inverse of :meth:`to_dict`; missing keys take their defaults."""
        data = check_keys("linear setting", d, _LINEAR_KEYS)
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class KVSetting:
    """How one layer's KV cache is stored: cache bits and token eviction."""

    bits: int = 16
    kept_tokens: int | None = None
    policy: EvictionPolicy = EvictionPolicy.NONE

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, KV_BITS)
        if self.kept_tokens is not None:
            check_int("kept_tokens", self.kept_tokens, minimum=1)
        object.__setattr__(self, "policy", coerce_enum(EvictionPolicy, "policy", self.policy))
        if (self.kept_tokens is not None) != (self.policy is not EvictionPolicy.NONE):
            raise ValueError(
                "kept_tokens must be set exactly when an eviction policy is chosen "
                "('sink_window' or 'snapkv'); policy 'none' requires kept_tokens=None; "
                f"got kept_tokens={self.kept_tokens!r}, policy={self.policy.value!r}"
            )

    @property
    def kind(self) -> UnitKind:
        return UnitKind.KV

    @property
    def is_dense(self) -> bool:
        return self.bits == 16 and self.kept_tokens is None

    def label(self) -> str:
        """Short human-readable form, e.g. ``"4b"`` or ``"4b keep512/snapkv"``."""
        text = f"{self.bits}b"
        if self.kept_tokens is not None:
            text += f" keep{self.kept_tokens}/{self.policy.value}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "kept_tokens": self.kept_tokens, "policy": self.policy.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVSetting:
        """Inverse of :meth:`to_dict`; missing keys take their defaults."""
        data = check_keys("kv setting", d, _KV_KEYS)
        return cls(**data)  # type: ignore[arg-type]


Setting: TypeAlias = LinearSetting | KVSetting
