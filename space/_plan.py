"""Plans: an immutable map from unit key to the setting chosen for that unit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

from ._settings import KVSetting, LinearSetting, Setting
from ._units import Unit, UnitKind

PLAN_FORMAT_VERSION = 1

_DENSE_LINEAR = LinearSetting()
_DENSE_KV = KVSetting()


class Plan(Mapping[str, Setting]):
    """Immutable, hashable mapping ``unit key -> Setting``.

    Units absent from a plan are dense (16-bit, nothing removed). The
    canonical JSON form and its sha256 :attr:`key` identify a plan across
    processes, so they must not depend on insertion order.
    """

    __slots__ = ("_index", "_items", "_json", "_key")

    _items: tuple[tuple[str, Setting], ...]
    _index: dict[str, Setting]
    _json: str | None
    _key: str | None

    def __init__(self, settings: Mapping[str, Setting] | None = None) -> None:
        items = dict(settings or {})
        for name, setting in items.items():
            _check_entry(name, setting)
        object.__setattr__(self, "_items", tuple(sorted(items.items())))
        object.__setattr__(self, "_index", items)
        object.__setattr__(self, "_json", None)
        object.__setattr__(self, "_key", None)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Plan is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Plan is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[type[Plan], tuple[dict[str, Setting]]]:
        # Default slot pickling would go through the blocked __setattr__.
        return (Plan, (dict(self._items),))

    def __getitem__(self, key: str) -> Setting:
        return self._index[key]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self._items == other._items

    def __repr__(self) -> str:
        return f"Plan(<{len(self)} units>, key={self.key[:12]})"

    def to_json(self) -> str:
        """Canonical JSON; equal plans give byte-identical text."""
        if self._json is None:
            units = {name: {**s.to_dict(), "kind": s.kind.value} for name, s in self._items}
            doc = {"units": units, "version": PLAN_FORMAT_VERSION}
            # repr-based float output in json round-trips floats exactly.
            text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
            object.__setattr__(self, "_json", text)
            return text
        return self._json

    @property
    def key(self) -> str:
        """sha256 hex digest of :meth:`to_json`; stable identity of the plan."""
        if self._key is None:
            digest = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
            object.__setattr__(self, "_key", digest)
            return digest
        return self._key

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse :meth:`to_json` output; malformed input raises ``ValueError``."""
        doc = _load_json(text)
        if not isinstance(doc, dict):
            raise ValueError(f"plan JSON must be an object; got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"units", "version"})
        if unknown:
            raise ValueError(f"plan JSON has unknown key(s) {', '.join(unknown)}; accepted keys: units, version")
        version = doc.get("version")
        if type(version) is not int or version != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan JSON version must be {PLAN_FORMAT_VERSION}; got {version!r}")
        units = doc.get("units")
        if not isinstance(units, dict):
            raise ValueError(f"plan JSON 'units' must be an object; got {units!r}")
        return cls({name: _setting_from_json(name, entry) for name, entry in units.items()})

    def with_settings(self, settings: Mapping[str, Setting]) -> Plan:
        """A new plan with the given units set (added or replaced)."""
        merged: dict[str, Setting] = dict(self._items)
        merged.update(settings)
        return Plan(merged)

    @classmethod
    def uniform(
        cls,
        units: Iterable[Unit],
        linear: LinearSetting = _DENSE_LINEAR,
        kv: KVSetting = _DENSE_KV,
    ) -> Plan:
        """Every linear unit gets ``linear`` and every KV unit gets ``kv``."""
        _check_entry("linear", linear, UnitKind.LINEAR)
        _check_entry("kv", kv, UnitKind.KV)
        chosen: dict[str, Setting] = {}
        for unit in units:
            chosen[unit.key] = linear if unit.kind is UnitKind.LINEAR else kv
        return cls(chosen)


def _check_entry(name: object, setting: object, kind: UnitKind | None = None) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"plan keys must be non-empty unit key strings; got {name!r}")
    if not isinstance(setting, LinearSetting | KVSetting):
        raise ValueError(f"plan value for {name!r} must be a LinearSetting or KVSetting; got {type(setting).__name__}")
    if kind is not None and setting.kind is not kind:
        expected = "LinearSetting" if kind is UnitKind.LINEAR else "KVSetting"
        raise ValueError(f"{name} must be a {expected}; got {type(setting).__name__}")


def _reject_constant(token: str) -> NoReturn:
    raise ValueError(f"plan JSON must not contain {token}; only finite numbers are accepted")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"plan JSON has duplicate key {name!r}; each key may appear once")
        result[name] = value
    return result


def _load_json(text: str | bytes) -> Any:
    if not isinstance(text, str | bytes):
        raise ValueError(f"plan JSON must be str or bytes; got {type(text).__name__}")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except json.JSONDecodeError as err:
        raise ValueError(f"plan JSON is not valid JSON ({err}); expected Plan.to_json() output") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"plan JSON is not valid UTF-8 ({err})") from None


def _setting_from_json(name: str, entry: object) -> Setting:
    if not isinstance(entry, dict):
        raise ValueError(f"plan JSON unit {name!r} must be an object; got {entry!r}")
    fields = dict(entry)
    kind = fields.pop("kind", None)
    try:
        if kind == UnitKind.LINEAR.value:
            return LinearSetting.from_dict(fields)
        if kind == UnitKind.KV.value:
            return KVSetting.from_dict(fields)
    except (ValueError, TypeError) as err:
        raise ValueError(f"plan JSON unit {name!r}: {err}") from None
    raise ValueError(f"plan JSON unit {name!r} has kind {kind!r}; accepted kinds: 'linear', 'kv'")
