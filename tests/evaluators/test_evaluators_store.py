"""The level store: entries built once and reused, exact bytes, exact assembly, safe files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

import budgetpress.evaluators._store as store_module
from budgetpress.evaluators import (
    LevelStore,
    Methods,
    MissingEntryError,
    apply_plan_,
    calibration_key,
    collect_input_stats,
    load_model,
    model_key,
    profile_model,
    resolve_model,
)
from budgetpress.space import KVSetting, LinearSetting, ModelProfile, Plan, Setting, linear_bytes

SPACE = (
    LinearSetting(),
    LinearSetting(bits=4, group_size=32),
    LinearSetting(bits=16, sparsity=0.5, pattern="2:4"),
    LinearSetting(bits=4, group_size=64, sparsity=0.3, pattern="unstructured"),
    LinearSetting(bits=8, group_size=32, rank=16),
)
COMPRESSED = [s for s in SPACE if not s.is_dense]
RTN = Methods()
GPTQ = Methods.parse("bits=gptq")
# Bytes per file beyond the tensors: the safetensors header (tensor table, module metadata, entry key).
HEADER_ALLOWANCE = 2048


@pytest.fixture(scope="module")
def micro(micro_model_dir: Path) -> tuple[Callable[[], PreTrainedModel], ModelProfile]:
    source = resolve_model(str(micro_model_dir))

    def fresh() -> PreTrainedModel:
        return load_model(source)

    return fresh, profile_model(fresh(), name="micro")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(3))


def space_of(profile: ModelProfile) -> dict[str, Sequence[LinearSetting]]:
    return {unit.key: SPACE for unit in profile.linear_units}


def plan_of(profile: ModelProfile, offset: int) -> Plan:
    """Unit i takes SPACE[(i + offset) % len]: every setting, dense included, on some units."""
    settings: dict[str, Setting] = {
        unit.key: SPACE[(i + offset) % len(SPACE)] for i, unit in enumerate(profile.linear_units)
    }
    settings.update((unit.key, KVSetting()) for unit in profile.kv_units)
    return Plan(settings)


def logits(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output: torch.Tensor = model(input_ids=token_ids, use_cache=False).logits
    return output


def counting_stats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the store's calibration passes."""
    calls: list[int] = []
    original = store_module.collect_input_stats

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(store_module, "collect_input_stats", counted)
    return calls


def test_build_once_then_reuse_with_exact_bytes(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh, profile = micro
    model = fresh()
    store = LevelStore(tmp_path, model_key=model_key(model))
    n_entries = len(profile.linear_units) * len(COMPRESSED)

    first = store.build(model, space_of(profile), progress=True)
    captured = capsys.readouterr()
    assert "level store" in captured.err and captured.out == ""
    assert (first.built, first.reused) == (n_entries, 0)
    second = store.build(model, space_of(profile), progress=False)
    assert (second.built, second.reused) == (0, n_entries)
    assert len(store.entries()) == n_entries
    assert all(isinstance(model.get_submodule(u.key), nn.Linear) for u in profile.linear_units)

    expected = sum(linear_bytes(u, s) for u in profile.linear_units for s in COMPRESSED)
    assert first.packed_bytes == second.packed_bytes == store.packed_bytes() == expected
    assert first.disk_bytes == second.disk_bytes == store.disk_bytes()
    assert expected < store.disk_bytes() <= 1.05 * expected + HEADER_ALLOWANCE * n_entries
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == n_entries and all(p.suffix == ".safetensors" for p in files)


def test_stats_once_and_keys_by_method_and_calibration(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile],
    tokens: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh, profile = micro
    model, space, n_units = fresh(), space_of(profile), len(profile.linear_units)
    key, cal_a, cal_b = model_key(model), calibration_key(tokens), calibration_key(tokens[:2])
    calls = counting_stats(monkeypatch)

    rtn = LevelStore(tmp_path, model_key=key).build(model, space, progress=False)
    assert (rtn.built, calls) == (4 * n_units, [])
    # GPTQ reads statistics for the bits setting and for magnitude's quantized kept weights; the
    # 16-bit 2:4 and the SVD entries depend on neither and are shared with the RTN store.
    gptq_a = LevelStore(tmp_path, model_key=key, calibration_key=cal_a, methods=GPTQ)
    report = gptq_a.build(model, space, calibration_tokens=tokens, progress=False)
    assert (report.built, report.reused, len(calls)) == (2 * n_units, 2 * n_units, 1)
    gptq_b = LevelStore(tmp_path, model_key=key, calibration_key=cal_b, methods=GPTQ)
    report = gptq_b.build(model, space, calibration_tokens=tokens[:2], progress=False)
    assert (report.built, report.reused, len(calls)) == (2 * n_units, 2 * n_units, 2)
    report = gptq_b.build(model, space, calibration_tokens=tokens[:2], progress=False)
    assert (report.built, len(calls)) == (0, 2)
    rtn_b = LevelStore(tmp_path, model_key=key, calibration_key=cal_b).build(model, space, progress=False)
    assert (rtn_b.built, rtn_b.reused) == (0, 4 * n_units)
    wanda = LevelStore(tmp_path, model_key=key, calibration_key=cal_a, methods=Methods.parse("sparsity=wanda"))
    report = wanda.build(model, space, calibration_tokens=tokens, progress=False)
    assert (report.built, report.reused, len(calls)) == (2 * n_units, 2 * n_units, 3)
    assert len(gptq_a.entries()) == len(gptq_b.entries()) == 4 * n_units
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4 * n_units + 3 * 2 * n_units


@pytest.mark.parametrize("methods", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_assembly_equals_apply_plan(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile],
    tokens: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    methods: Methods,
) -> None:
    fresh, profile = micro
    resident = fresh()
    dense_logits = logits(resident, tokens)
    cal = calibration_key(tokens) if methods is GPTQ else None
    store = LevelStore(tmp_path, model_key=model_key(resident), calibration_key=cal, methods=methods)
    store.build(resident, space_of(profile), calibration_tokens=tokens, progress=False)

    def reference(plan: Plan) -> torch.Tensor:
        model = fresh()
        stats = collect_input_stats(model, tokens) if methods is GPTQ else None
        return logits(apply_plan_(model, plan, methods=methods, stats=stats), tokens)

    def no_recompression(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("assembly must not recompress")

    monkeypatch.setattr(store_module, "compress_weight", no_recompression)
    plan_a, plan_b = plan_of(profile, 0), plan_of(profile, 2)
    assert torch.equal(logits(store.assemble_(resident, plan_a), tokens), reference(plan_a))
    assert torch.equal(logits(store.assemble_(resident, plan_b), tokens), reference(plan_b))
    # A plan that leaves units out (or sets them dense) gives their original nn.Linear back.
    assert torch.equal(logits(store.assemble_(resident, Plan({})), tokens), dense_logits)
    assert all(isinstance(resident.get_submodule(u.key), nn.Linear) for u in profile.linear_units)


def test_modules_are_read_once_and_kv_settings_ignored(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], tmp_path: Path
) -> None:
    fresh, profile = micro
    model = fresh()
    store = LevelStore(tmp_path, model_key=model_key(model))
    unit = profile.linear_units[0].key
    store.build(model, {unit: SPACE}, progress=False)
    first = store.module(unit, SPACE[1])
    store.path(unit, SPACE[1]).unlink()
    assert store.module(unit, SPACE[1]) is first
    plan = Plan({unit: SPACE[1], profile.kv_units[0].key: KVSetting(bits=4)})
    assert store.assemble_(model, plan).get_submodule(unit) is first


def test_missing_entries_and_bad_inputs_are_clear_errors(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], tokens: torch.Tensor, tmp_path: Path
) -> None:
    fresh, profile = micro
    model = fresh()
    unit = profile.linear_units[0].key
    store = LevelStore(tmp_path, model_key=model_key(model))
    with pytest.raises(MissingEntryError, match=f"no entry for unit '{unit}' at setting 4b/g32"):
        store.module(unit, SPACE[1])
    assert issubclass(MissingEntryError, ValueError) and issubclass(MissingEntryError, LookupError)
    with pytest.raises(MissingEntryError):
        store.assemble_(model, Plan({unit: SPACE[1]}))
    with pytest.raises(ValueError, match="dense setting has no store entry"):
        store.module(unit, LinearSetting())
    with pytest.raises(ValueError, match="not a module path"):
        store.build(model, {"../escape": SPACE}, progress=False)
    with pytest.raises(ValueError, match="give the store a calibration_key"):
        LevelStore(tmp_path, model_key=model_key(model), methods=GPTQ).build(model, {unit: SPACE}, progress=False)
    mismatched = LevelStore(tmp_path, model_key=model_key(model), calibration_key="0" * 64, methods=GPTQ)
    with pytest.raises(ValueError, match="not the calibration set"):
        mismatched.build(model, {unit: SPACE}, calibration_tokens=tokens, progress=False)
    with pytest.raises(ValueError, match="model_key"):
        LevelStore(tmp_path, model_key="abc")

    store.build(model, {unit: SPACE[:2]}, progress=False)
    store.assemble_(model, Plan({unit: SPACE[1]}))
    with pytest.raises(ValueError, match=r"not the dense nn\.Linear"):
        store.build(model, {unit: SPACE}, progress=False)
    with pytest.raises(ValueError, match="serves one resident model"):
        store.assemble_(fresh(), Plan({}))


def test_temporary_and_interrupted_writes_are_ignored(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh, profile = micro
    model = fresh()
    units = {u.key: SPACE for u in profile.linear_units[:2]}
    store = LevelStore(tmp_path, model_key=model_key(model))
    store.build(model, units, progress=False)
    disk, entries = store.disk_bytes(), store.entries()
    some = store.path(profile.linear_units[0].key, SPACE[1])
    (some.parent / f".{some.name}.x1y2z3.tmp").write_bytes(b"partial safetensors hea")
    report = store.build(model, units, progress=False)
    assert (report.built, store.disk_bytes(), store.entries()) == (0, disk, entries)
    assert store.module(profile.linear_units[0].key, SPACE[1]) is not None

    # A writer killed between writing and renaming leaves no entry and no temporary file behind.
    other = profile.linear_units[2].key

    def crash(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.build(model, {other: SPACE}, progress=False)
    assert not store.path(other, SPACE[1]).parent.exists() or not any(store.path(other, SPACE[1]).parent.iterdir())


def test_entry_files_are_checked_against_their_key(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], tmp_path: Path
) -> None:
    fresh, profile = micro
    model = fresh()
    unit = profile.linear_units[0].key
    store = LevelStore(tmp_path, model_key=model_key(model))
    store.build(model, {unit: SPACE}, progress=False)
    # A file copied over another entry's name is refused rather than served as that entry.
    store.path(unit, SPACE[2]).write_bytes(store.path(unit, SPACE[1]).read_bytes())
    with pytest.raises(ValueError, match="holds entry"):
        store.module(unit, SPACE[2])


def test_model_and_calibration_keys(
    micro: tuple[Callable[[], PreTrainedModel], ModelProfile], micro_model_dir: Path, tokens: torch.Tensor
) -> None:
    fresh, _ = micro
    model = fresh()
    key = model_key(model)
    assert key == model_key(fresh()) == model_key(model, checkpoint_dir=micro_model_dir)
    assert key != model_key(load_model(resolve_model(str(micro_model_dir)), dtype=torch.bfloat16))
    # Without a local checkpoint the tensors themselves are hashed.
    model.config._name_or_path = "not-a-directory"
    by_tensors = model_key(model)
    assert by_tensors != key and by_tensors == model_key(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_key(model) != by_tensors

    assert calibration_key(tokens) == calibration_key(tokens.clone().int())
    assert calibration_key(tokens) != calibration_key(tokens[:2])
    assert calibration_key(tokens) != calibration_key(tokens.reshape(6, 24))
