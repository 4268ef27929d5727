"""The search space: which settings each group of units may take."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ._check import coerce_enum, is_int
from ._plan import Plan
from ._profile import ModelProfile
from ._settings import EvictionPolicy, KVSetting, LinearSetting, Setting, SparsityPattern
from ._units import LinearUnit

_DENSE_LINEAR = LinearSetting()
_DENSE_KV = KVSetting()


class Dimension(StrEnum):
    """What a search may change: weight bits, sparsity, low rank, KV cache."""

    BITS = "bits"
    SPARSITY = "sparsity"
    RANK = "rank"
    KV = "kv"


def parse_dimensions(text: str) -> frozenset[Dimension]:
    """``"bits,sparsity,rank,kv"`` (any non-empty subset, any order) → the set of dimensions."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    accepted = ", ".join(d.value for d in Dimension)
    if not names:
        raise ValueError(f"space must name at least one dimension of {accepted}; got {text!r}")
    dims = set()
    for name in names:
        try:
            dims.add(Dimension(name))
        except ValueError:
            raise ValueError(f"unknown space dimension {name!r}; accepted: {accepted}") from None
    return frozenset(dims)


def plan_dimensions(plan: Plan) -> frozenset[Dimension]:
    """The dimensions a plan actually uses (a 16-bit low-rank factor uses rank, not bits)."""
    return frozenset().union(*(setting_dimensions(setting) for setting in plan.values()))


def setting_dimensions(setting: Setting) -> frozenset[Dimension]:
    """The dimensions one setting uses; a dense setting uses none."""
    if isinstance(setting, KVSetting):
        return frozenset() if setting.is_dense else frozenset({Dimension.KV})
    used: set[Dimension] = set()
    if setting.bits != 16:
        used.add(Dimension.BITS)
    if setting.sparsity:
        used.add(Dimension.SPARSITY)
    if setting.rank is not None:
        used.add(Dimension.RANK)
    return frozenset(used)


class Grouping(StrEnum):
    """Which linear units are forced to share one choice."""

    UNIT = "unit"
    LAYER = "layer"
    ROLE = "role"


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSpace:
    """Choices per group of units; a point in the space is a :class:`Plan`.

    Linear groups are named by unit key (UNIT), ``"layer.<i>"`` (LAYER) or
    ``"role.<role>"`` (ROLE). KV units are always their own group, named
    by their key (``"kv.3"``).
    """

    profile: ModelProfile
    linear_choices: tuple[LinearSetting, ...]
    kv_choices: tuple[KVSetting, ...] = (_DENSE_KV,)
    grouping: Grouping = Grouping.UNIT
    _groups: tuple[tuple[str, tuple[str, ...]], ...] = field(init=False, repr=False, compare=False)
    _kv_groups: frozenset[str] = field(init=False, repr=False, compare=False)
    _linear_groups: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grouping", coerce_enum(Grouping, "grouping", self.grouping))
        object.__setattr__(self, "linear_choices", tuple(self.linear_choices))
        object.__setattr__(self, "kv_choices", tuple(self.kv_choices))
        _check_choices("linear_choices", self.linear_choices, LinearSetting)
        _check_choices("kv_choices", self.kv_choices, KVSetting)
        for unit in self.profile.linear_units:
            for choice in self.linear_choices:
                _check_fits(unit, choice)
        linear_groups = _group_linear(self.profile.linear_units, self.grouping)
        kv_groups = tuple((u.key, (u.key,)) for u in self.profile.kv_units)
        object.__setattr__(self, "_groups", linear_groups + kv_groups)
        object.__setattr__(self, "_kv_groups", frozenset(name for name, _ in kv_groups))
        object.__setattr__(self, "_linear_groups", frozenset(name for name, _ in linear_groups))

    @classmethod
    def bits_only(
        cls,
        profile: ModelProfile,
        bits: Sequence[int] = (2, 3, 4, 8, 16),
        group_size: int | None = 128,
        grouping: Grouping = Grouping.UNIT,
    ) -> SearchSpace:
        """Weight-only quantization at each of ``bits``; KV stays 16-bit."""
        choices = tuple(LinearSetting(bits=b, group_size=group_size) for b in bits)
        return cls(profile=profile, linear_choices=choices, grouping=grouping)

    @classmethod
    def for_dimensions(
        cls,
        profile: ModelProfile,
        dimensions: frozenset[Dimension],
        *,
        context: int,
        grouping: Grouping = Grouping.UNIT,
    ) -> SearchSpace:
        """The default choices of each dimension in ``dimensions`` (combined where they combine).

        ``context`` (the workload's) sets the KV token budgets: half and a quarter of it.
        """
        return cls(
            profile=profile,
            linear_choices=linear_choices_for(profile, dimensions),
            kv_choices=kv_choices_for(dimensions, context=context),
            grouping=grouping,
        )

    def groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``(group name, member unit keys)``: linear groups first, then KV."""
        return self._groups

    def choices(self, group_name: str) -> tuple[Setting, ...]:
        if group_name in self._kv_groups:
            return self.kv_choices
        if group_name in self._linear_groups:
            return self.linear_choices
        raise KeyError(f"no group {group_name!r} in this search space; see groups() for names")

    def size(self) -> int:
        """Number of distinct plans in the space."""
        return math.prod(len(self.choices(name)) for name, _ in self._groups)

    def plan_from_choices(self, indices: Mapping[str, int]) -> Plan:
        """Build the plan that puts each group at ``choices(group)[index]``."""
        unknown = sorted(set(indices) - self._kv_groups - self._linear_groups)
        if unknown:
            raise ValueError(
                f"unknown group(s) {', '.join(map(repr, unknown[:5]))}; accepted names are those of groups()"
            )
        settings: dict[str, Setting] = {}
        for name, members in self._groups:
            setting = self._chosen(name, indices)
            settings.update((key, setting) for key in members)
        return Plan(settings)

    def _chosen(self, name: str, indices: Mapping[str, int]) -> Setting:
        if name not in indices:
            raise ValueError(f"no choice given for group {name!r}; every group needs an index")
        options = self.choices(name)
        index = indices[name]
        if not is_int(index) or not 0 <= index < len(options):
            raise ValueError(f"choice for group {name!r} must be an integer in [0, {len(options) - 1}]; got {index!r}")
        return options[index]

    def choices_of(self, plan: Plan) -> dict[str, int]:
        """Inverse of :meth:`plan_from_choices`; units absent from ``plan`` are dense."""
        known = {key for _, members in self._groups for key in members}
        unknown = sorted(set(plan) - known)
        if unknown:
            raise ValueError(
                f"plan has unit(s) {', '.join(map(repr, unknown[:5]))} that are not in this search space's profile"
            )
        return {name: self._index_of(name, members, plan) for name, members in self._groups}

    def _index_of(self, name: str, members: tuple[str, ...], plan: Plan) -> int:
        dense = _DENSE_KV if name in self._kv_groups else _DENSE_LINEAR
        found = {plan.get(key, dense) for key in members}
        if len(found) != 1:
            labels = ", ".join(sorted(s.label() for s in found))
            raise ValueError(
                f"plan gives group {name!r} several settings ({labels}); under grouping "
                f"{self.grouping.value!r} all its units must share one setting"
            )
        setting = found.pop()
        options = self.choices(name)
        if setting not in options:
            raise ValueError(
                f"plan gives group {name!r} setting {setting.label()!r}, which is not a "
                f"choice; accepted: {', '.join(s.label() for s in options)}"
            )
        return options.index(setting)

    def uniform_plans(self) -> list[Plan]:
        """One plan per (linear choice, KV choice): every linear unit at the one, every KV cache at the
        other; linear-major, so without KV choices it is one plan per linear choice."""
        plans = []
        for i in range(len(self.linear_choices)):
            for k in range(len(self.kv_choices)):
                indices = {name: k if name in self._kv_groups else i for name, _ in self._groups}
                plans.append(self.plan_from_choices(indices))
        return plans


def _check_choices(name: str, choices: tuple[Setting, ...], expected: type) -> None:
    if not choices:
        raise ValueError(f"{name} must not be empty; give at least one {expected.__name__}")
    for choice in choices:
        if not isinstance(choice, expected):
            raise ValueError(f"{name} must hold {expected.__name__} values; got {choice!r}")
    seen: set[Setting] = set()
    for choice in choices:
        if choice in seen:
            raise ValueError(f"{name} lists {choice.label()!r} twice; choices must be distinct")
        seen.add(choice)


def _check_fits(unit: LinearUnit, choice: LinearSetting) -> None:
    n_in, n_out = unit.in_features, unit.out_features
    problem = None
    if choice.pattern is SparsityPattern.SEMI_2_4 and n_in % 4:
        problem = f"2:4 sparsity needs in_features divisible by 4 (in_features={n_in})"
    elif choice.rank is not None and choice.rank >= min(n_in, n_out):
        problem = f"rank must be < min(in_features, out_features) = {min(n_in, n_out)}"
    elif choice.group_size is not None and n_in % choice.group_size:
        problem = f"group size must divide in_features={n_in} (or be per-channel, None)"
    if problem:
        raise ValueError(f"choice {choice.label()!r} does not fit unit {unit.name!r}: {problem}")


def _group_linear(units: tuple[LinearUnit, ...], grouping: Grouping) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if grouping is Grouping.UNIT:
        return tuple((u.key, (u.key,)) for u in units)
    members: dict[str, list[str]] = {}
    if grouping is Grouping.LAYER:
        for u in sorted(units, key=lambda u: u.layer):
            members.setdefault(f"layer.{u.layer}", []).append(u.key)
    else:
        # Roles keep the order in which they first appear in the profile.
        for u in units:
            members.setdefault(f"role.{u.role}", []).append(u.key)
    return tuple((name, tuple(keys)) for name, keys in members.items())


DEFAULT_GROUP = 128


def _rank_choices(profile: ModelProfile) -> tuple[int, ...]:
    """A quarter and an eighth of the narrowest unit's smaller side, in multiples of 8."""
    narrowest = min(min(u.in_features, u.out_features) for u in profile.linear_units)
    ranks = {max(8, narrowest // d // 8 * 8) for d in (4, 8)}
    return tuple(sorted(r for r in ranks if r < narrowest))


def linear_choices_for(profile: ModelProfile, dimensions: frozenset[Dimension]) -> tuple[LinearSetting, ...]:
    """Dense first, then each dimension's settings; with bits, sparse and low-rank ones quantized too."""
    bits = Dimension.BITS in dimensions
    group = DEFAULT_GROUP if all(u.in_features % DEFAULT_GROUP == 0 for u in profile.linear_units) else None
    choices = [_DENSE_LINEAR]
    if bits:
        choices += [LinearSetting(bits=b, group_size=group) for b in (2, 3, 4, 8)]
    if Dimension.SPARSITY in dimensions:
        unstructured = SparsityPattern.UNSTRUCTURED
        choices += [LinearSetting(sparsity=s, pattern=unstructured) for s in (0.5, 0.7)]
        semi = all(u.in_features % 4 == 0 for u in profile.linear_units)
        if semi:
            choices.append(LinearSetting(sparsity=0.5, pattern=SparsityPattern.SEMI_2_4))
        if bits:
            choices.append(LinearSetting(bits=4, group_size=group, sparsity=0.5, pattern=unstructured))
            if semi:
                choices.append(LinearSetting(bits=4, group_size=group, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4))
    if Dimension.RANK in dimensions:
        for rank in _rank_choices(profile):
            choices.append(LinearSetting(rank=rank))
            if bits:
                choices.append(LinearSetting(bits=8, group_size=group, rank=rank))
    return tuple(choices)


def kv_choices_for(dimensions: frozenset[Dimension], *, context: int) -> tuple[KVSetting, ...]:
    """Dense only without the kv dimension; else bits 8/4/2 and SnapKV budgets of half and a quarter."""
    if Dimension.KV not in dimensions:
        return (_DENSE_KV,)
    choices = [_DENSE_KV, KVSetting(bits=8), KVSetting(bits=4), KVSetting(bits=2)]
    for kept, bits in ((context // 2, 16), (context // 2, 4), (context // 4, 4)):
        if kept >= 1:
            choices.append(KVSetting(bits=bits, kept_tokens=kept, policy=EvictionPolicy.SNAPKV))
    return tuple(dict.fromkeys(choices))
