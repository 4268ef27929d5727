"""A model described only by what the memory model and search space need."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._check import check_int, check_keys
from ._units import KVUnit, LinearUnit, Unit

_PROFILE_KEYS = (
    "name",
    "architecture",
    "n_layers",
    "linear_units",
    "kv_units",
    "other_params",
    "other_bytes",
    "vocab_size",
)
_LINEAR_KEYS = ("name", "layer", "in_features", "out_features", "has_bias")
_KV_KEYS = ("layer", "n_kv_heads", "head_dim")
# has_bias has a default; every other field must be given explicitly.
_OPTIONAL = ("has_bias",)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """Shapes of a model's linear layers and KV caches plus everything else.

    ``other_params``/``other_bytes`` cover parameters outside every linear
    unit (embeddings, norms, an untied lm_head that is not a unit, ...);
    they are always counted at their stored size.
    """

    name: str
    architecture: str
    n_layers: int
    linear_units: tuple[LinearUnit, ...]
    kv_units: tuple[KVUnit, ...]
    other_params: int
    other_bytes: int
    vocab_size: int
    _by_key: dict[str, Unit] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for label in ("name", "architecture"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string; got {value!r}")
        check_int("n_layers", self.n_layers, minimum=1)
        check_int("other_params", self.other_params, minimum=0)
        check_int("other_bytes", self.other_bytes, minimum=0)
        check_int("vocab_size", self.vocab_size, minimum=1)
        # Lists are accepted for convenience but stored as tuples to stay hashable.
        object.__setattr__(self, "linear_units", tuple(self.linear_units))
        object.__setattr__(self, "kv_units", tuple(self.kv_units))
        object.__setattr__(self, "_by_key", self._index_units())

    def _index_units(self) -> dict[str, Unit]:
        by_key: dict[str, Unit] = {}
        groups = (("linear_units", LinearUnit, self.linear_units), ("kv_units", KVUnit, self.kv_units))
        for group, expected, units in groups:
            for unit in units:
                if not isinstance(unit, expected):
                    raise ValueError(f"{group} must hold only {expected.__name__} values; got {unit!r}")
                self._check_unit(unit, by_key)
                by_key[unit.key] = unit
        return by_key

    def _check_unit(self, unit: Unit, seen: Mapping[str, Unit]) -> None:
        if not 0 <= unit.layer < self.n_layers:
            raise ValueError(
                f"unit {unit.key!r} has layer {unit.layer}; accepted layers are "
                f"0..{self.n_layers - 1} (n_layers={self.n_layers})"
            )
        if unit.key in seen:
            raise ValueError(f"unit key {unit.key!r} appears twice; unit keys must be unique")

    def units(self) -> tuple[Unit, ...]:
        """All units: linear units in profile order, then KV units."""
        return (*self.linear_units, *self.kv_units)

    def unit(self, key: str) -> Unit:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(
                f"no unit {key!r} in profile {self.name!r}; keys are linear module "
                f"paths like {self._example_key()!r} or 'kv.<layer>'"
            ) from None

    def _example_key(self) -> str:
        return self.linear_units[0].key if self.linear_units else "model.layers.0.mlp.up_proj"

    @property
    def n_params(self) -> int:
        return sum(u.n_params for u in self.linear_units) + self.other_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "linear_units": [_linear_to_dict(u) for u in self.linear_units],
            "kv_units": [_kv_to_dict(u) for u in self.kv_units],
            "other_params": self.other_params,
            "other_bytes": self.other_bytes,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelProfile:
        data = _require_keys("model profile", d, _PROFILE_KEYS)
        data["linear_units"] = tuple(
            _build(LinearUnit, "linear unit", u, _LINEAR_KEYS) for u in _as_list("linear_units", data["linear_units"])
        )
        data["kv_units"] = tuple(_build(KVUnit, "kv unit", u, _KV_KEYS) for u in _as_list("kv_units", data["kv_units"]))
        return cls(**data)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model profile JSON is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _require_keys(what: str, data: object, keys: tuple[str, ...]) -> dict[str, object]:
    fields = check_keys(what, data, keys)
    missing = [k for k in keys if k not in fields and k not in _OPTIONAL]
    if missing:
        raise ValueError(f"{what} is missing key(s) {', '.join(missing)}; needed: {', '.join(keys)}")
    return fields


def _build(cls: type[T], what: str, data: object, keys: tuple[str, ...]) -> T:
    return cls(**_require_keys(what, data, keys))


def _as_list(name: str, value: object) -> list[object]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"model profile {name} must be a list; got {type(value).__name__}")
    return list(value)


def _linear_to_dict(unit: LinearUnit) -> dict[str, Any]:
    return {
        "name": unit.name,
        "layer": unit.layer,
        "in_features": unit.in_features,
        "out_features": unit.out_features,
        "has_bias": unit.has_bias,
    }


def _kv_to_dict(unit: KVUnit) -> dict[str, Any]:
    return {"layer": unit.layer, "n_kv_heads": unit.n_kv_heads, "head_dim": unit.head_dim}
