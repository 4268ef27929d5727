"""The units a compression plan talks about: linear layers and KV caches."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from ._check import check_int


class UnitKind(StrEnum):
    """What kind of thing a unit is; decides which setting type applies."""

    LINEAR = "linear"
    KV = "kv"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearUnit:
    """One ``nn.Linear``-like weight matrix of shape (out_features, in_features)."""

    name: str
    layer: int
    in_features: int
    out_features: int
    has_bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty module path string; got {self.name!r}")
        check_int("layer", self.layer, minimum=0)
        check_int("in_features", self.in_features, minimum=1)
        check_int("out_features", self.out_features, minimum=1)
        if not isinstance(self.has_bias, bool):
            raise ValueError(f"has_bias must be True or False; got {self.has_bias!r}")

    @property
    def key(self) -> str:
        return self.name

    @property
    def kind(self) -> UnitKind:
        return UnitKind.LINEAR

    @property
    def role(self) -> str:
        """Last dotted component of the module path, e.g. ``"q_proj"``."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def n_params(self) -> int:
        bias = self.out_features if self.has_bias else 0
        return self.in_features * self.out_features + bias


@dataclass(frozen=True, slots=True, kw_only=True)
class KVUnit:
    """The key/value cache of one decoder layer."""

    layer: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        check_int("layer", self.layer, minimum=0)
        check_int("n_kv_heads", self.n_kv_heads, minimum=1)
        check_int("head_dim", self.head_dim, minimum=1)

    @property
    def key(self) -> str:
        return f"kv.{self.layer}"

    @property
    def kind(self) -> UnitKind:
        return UnitKind.KV


Unit: TypeAlias = LinearUnit | KVUnit
