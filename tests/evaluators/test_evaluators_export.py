"""Export: native and compressed-tensors checkpoints, reloaded and compared with the evaluated plan.

"Exact" here means ``torch.equal``: the native export reloaded with ``load_compressed`` gives the same
logits, bit for bit, as the packed model in memory before the export (the level store's modules
assembled onto the dense model), and as ``PlanEvaluator``'s CPU assembly (dequantized stored
variants) for plans without low-rank units; a low-rank unit runs as two products in the packed
module and as one dequantized product in the evaluator, so those agree to float tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetpress.evaluators import (
    EvaluatedPlan,
    ExportError,
    ExportFormat,
    KVTokenSpec,
    PlanEvaluator,
    SessionSpec,
    TokenSpec,
    encoder_for,
    export_plan,
    export_trial,
    kv_continuation_log_probs,
    load_compressed,
    load_model,
    make_token_sets,
    open_session,
    resolve_model,
    verify_export,
)
from budgetpress.evaluators._export_trial import open_level_store
from budgetpress.kernels import PlanKVCache, QuantLinear, SparseLinear
from budgetpress.space import KVSetting, LinearSetting, Plan, Split, Workload

TOKENS = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
KV_TOKENS = KVTokenSpec(prefill_len=96, continuation_len=32, calibration_sequences=2, evaluation_sequences=2)
IDS = torch.tensor([list(b"def main():\n    return sorted(x for x in range(10))\n")])

L0, L1 = "model.layers.0", "model.layers.1"
MIXED = Plan(
    {
        f"{L0}.self_attn.q_proj": LinearSetting(bits=2, group_size=None),
        f"{L0}.self_attn.o_proj": LinearSetting(bits=3, group_size=64),
        f"{L0}.mlp.up_proj": LinearSetting(bits=4, group_size=128),
        f"{L0}.mlp.down_proj": LinearSetting(bits=8, group_size=32),
        f"{L1}.mlp.gate_proj": LinearSetting(sparsity=0.5, pattern="2:4"),
        f"{L1}.mlp.up_proj": LinearSetting(bits=4, sparsity=0.5, pattern="unstructured"),
        "kv.0": KVSetting(bits=4, kept_tokens=64, policy="snapkv"),
        "kv.1": KVSetting(bits=2),
    }
)
LOW_RANK = Plan(
    {
        f"{L0}.mlp.up_proj": LinearSetting(rank=32),
        f"{L1}.self_attn.o_proj": LinearSetting(rank=16, bits=8, group_size=None),
        f"{L1}.mlp.down_proj": LinearSetting(bits=4, group_size=128),
    }
)
PORTABLE = Plan(
    {
        f"{L0}.self_attn.q_proj": LinearSetting(bits=4, group_size=128),
        f"{L0}.self_attn.k_proj": LinearSetting(bits=4, group_size=128),
        f"{L0}.mlp.down_proj": LinearSetting(bits=2, group_size=64),
        f"{L1}.mlp.up_proj": LinearSetting(bits=8, group_size=None),
        f"{L1}.mlp.gate_proj": LinearSetting(bits=4, sparsity=0.5, pattern="2:4"),
    }
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> SessionSpec:
    """The calibration methods (GPTQ, SparseGPT, SVD-LLM) over a store holding every test plan's variants."""
    torch.set_num_threads(1)
    spec = SessionSpec(
        model="builtin",
        workload=Workload(context=512),
        tokens=TOKENS,
        kv_tokens=KV_TOKENS,
        store_root=str(tmp_path_factory.mktemp("export-store")),
        methods="bits=gptq,sparsity=sparsegpt,rank=svd-llm",
    )
    model = load_model(resolve_model(spec.model))
    calibration = make_token_sets(TOKENS, encoder_for(resolve_model(spec.model))).calibration
    store = open_level_store(spec, model, calibration)
    wanted: dict[str, list[LinearSetting]] = {}
    for plan in (MIXED, LOW_RANK, PORTABLE):
        for key, setting in plan.items():
            if isinstance(setting, LinearSetting):
                wanted.setdefault(key, []).append(setting)
    store.build(model, wanted, calibration_tokens=calibration, progress=False)
    return spec


@pytest.fixture(scope="module")
def evaluator(spec: SessionSpec) -> PlanEvaluator:
    return open_session(spec).evaluator


def _packed_model(spec: SessionSpec, plan: Plan) -> torch.nn.Module:
    """The dense model with the plan's packed modules from the level store: what a GPU worker runs."""
    model = load_model(resolve_model(spec.model))
    calibration = make_token_sets(TOKENS, encoder_for(resolve_model(spec.model))).calibration
    open_level_store(spec, model, calibration).assemble_(model, plan)
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _evaluate(evaluator: PlanEvaluator, plan: Plan, max_tokens: int | None = None) -> EvaluatedPlan:
    result = evaluator.evaluate(plan, split=Split.CALIBRATION, max_tokens=max_tokens)
    return EvaluatedPlan(plan=plan, kl=result.kl, fidelity=max_tokens, memory_bytes=result.memory_bytes)


# -- native ------------------------------------------------------------------------------------------------------


def test_native_reload_is_bit_exact_to_the_packed_model(spec: SessionSpec, tmp_path: Path) -> None:
    model = _packed_model(spec, MIXED)
    report = export_plan(model, MIXED, out=tmp_path / "native", source_dir=resolve_model(spec.model).local_dir)
    reloaded = load_compressed(tmp_path / "native")
    assert torch.equal(_logits(reloaded), _logits(model))
    for key in MIXED:
        if key.startswith("model."):
            held = dict(model.get_submodule(key).named_buffers())
            assert all(torch.equal(t, dict(reloaded.get_submodule(key).named_buffers())[n]) for n, t in held.items())
    # The plan's KV cache: the same continuation log-probs under PlanKVCache, and generate's default cache.
    tokens = make_token_sets(TOKENS, encoder_for(resolve_model(spec.model))).evaluation[:2]
    ours = kv_continuation_log_probs(model, tokens, prefill_len=96, plan=MIXED)
    assert torch.equal(kv_continuation_log_probs(reloaded, tokens, prefill_len=96, plan=MIXED), ours)
    out = reloaded.generate(IDS, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, PlanKVCache) and out.cache.settings[1] == MIXED["kv.1"]
    assert reloaded.budgetpress_plan == MIXED
    assert report.weight_bytes_on_disk == (tmp_path / "native" / "model.safetensors").stat().st_size
    assert abs(report.disk_ratio - 1) < 0.05, report.to_dict()


def test_native_trial_export_matches_the_evaluation(
    spec: SessionSpec, evaluator: PlanEvaluator, tmp_path: Path
) -> None:
    evaluated = _evaluate(evaluator, MIXED, max_tokens=300)
    evaluator_logits = _logits(evaluator.model)
    exported = export_trial(spec, evaluated, out=tmp_path / "trial", verify=True)
    assert exported.reloaded_kl == evaluated.kl  # the same tokens, protocol and arithmetic: exactly
    assert exported.memory_bytes == evaluated.memory_bytes
    assert exported.recomputed_units == ()
    assert torch.equal(_logits(load_compressed(tmp_path / "trial")), evaluator_logits)
    assert abs(exported.export.disk_ratio - 1) < 0.05
    record = json.loads((tmp_path / "trial" / "budgetpress.json").read_text())
    assert record["plan_key"] == MIXED.key and record["compute_dtype"] == "float32"
    assert Plan.from_json((tmp_path / "trial" / "plan.json").read_text()) == MIXED


def test_low_rank_export_agrees_with_the_evaluator_to_tolerance(
    spec: SessionSpec, evaluator: PlanEvaluator, tmp_path: Path
) -> None:
    evaluated = _evaluate(evaluator, LOW_RANK)
    evaluator_logits = _logits(evaluator.model)
    exported = export_trial(spec, evaluated, out=tmp_path / "rank")
    reloaded = load_compressed(tmp_path / "rank")
    assert torch.equal(_logits(reloaded), _logits(_packed_model(spec, LOW_RANK)))
    assert torch.allclose(_logits(reloaded), evaluator_logits, atol=1e-4, rtol=0)
    assert exported.reloaded_kl == pytest.approx(evaluated.kl, rel=1e-3)


def test_missing_store_entries_are_recomputed_identically(spec: SessionSpec, tmp_path: Path) -> None:
    copied = dataclasses.replace(spec, store_root=str(tmp_path / "empty-store"))
    first = export_trial(spec, EvaluatedPlan(plan=PORTABLE), out=tmp_path / "a", verify=False)
    again = export_trial(copied, EvaluatedPlan(plan=PORTABLE), out=tmp_path / "b", verify=False)
    assert sorted(again.recomputed_units) == sorted(k for k in PORTABLE if k.startswith("model."))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first.export.manifest_sha256 != again.export.manifest_sha256  # provenance names the recomputation


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():  # bf16 values, as a bf16 checkpoint loaded in float32 holds
            parameter.copy_(parameter.bfloat16().float())
    from budgetpress.evaluators import apply_plan_

    plan = Plan({"model.layers.0.mlp.up_proj": LinearSetting(bits=4, group_size=64)})
    apply_plan_(model, plan)
    export_plan(model, plan, out=tmp_path / "tied")
    reloaded = load_compressed(tmp_path / "tied")
    ids = torch.randint(0, 64, (1, 12))
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


# -- compressed-tensors ------------------------------------------------------------------------------------------


def test_compressed_tensors_reloads_with_plain_transformers(
    spec: SessionSpec, evaluator: PlanEvaluator, tmp_path: Path
) -> None:
    evaluated = _evaluate(evaluator, PORTABLE)
    exported = export_trial(
        spec, evaluated, out=tmp_path / "ct", export_format="compressed-tensors", densify_sparse=True
    )
    assert exported.export.format is ExportFormat.COMPRESSED_TENSORS
    packed = _packed_model(spec, PORTABLE)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    _logits(loaded)  # compressed-tensors decompresses on the first forward; then each weight is ours, dequantized
    for key in PORTABLE:
        assert torch.equal(loaded.get_submodule(key).weight, packed.get_submodule(key).dequantized_weight())
    assert torch.allclose(_logits(loaded), _logits(packed), atol=1e-5, rtol=0)
    assert exported.reloaded_kl == pytest.approx(evaluated.kl, rel=1e-4)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in config["config_groups"].values()) == [
        (2, 64),
        (4, 128),
        (8, None),
    ]
    assert all(not g["weights"]["symmetric"] for g in config["config_groups"].values())
    default = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # plain: the checkpoint's bf16
    assert default.dtype == torch.bfloat16
    reference = _logits(packed)
    assert (_logits(default) - reference).abs().max() < 0.02 * reference.abs().max()  # bf16 arithmetic
    assert exported.export.disk_ratio < 1.05
    assert any("sparse units are stored dense" in note for note in exported.export.notes)


def test_compressed_tensors_names_every_inexpressible_unit(spec: SessionSpec, tmp_path: Path) -> None:
    model = _packed_model(spec, MIXED)
    with pytest.raises(ExportError) as error:
        export_plan(model, MIXED, out=tmp_path / "ct", export_format="compressed-tensors")
    message = str(error.value)
    for fragment in (
        "KV-cache settings",
        "kv.0 (4b keep64/snapkv)",
        "kv.1 (2b)",
        "3-bit codes",
        f"{L0}.self_attn.o_proj (3b/g64)",
        "sparsity has no compressed-tensors layout",
        f"{L1}.mlp.gate_proj (16b s50%2:4)",
        "--format native",
    ):
        assert fragment in message
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []
    rank_model = _packed_model(spec, LOW_RANK)
    with pytest.raises(ExportError, match=r"low-rank factors .*model\.layers\.0\.mlp\.up_proj \(16b r32\)"):
        export_plan(rank_model, LOW_RANK, out=tmp_path / "ct", export_format="compressed-tensors")


def test_densified_sparse_units_keep_their_exact_weights(spec: SessionSpec, tmp_path: Path) -> None:
    plan = Plan({k: s for k, s in MIXED.items() if k.startswith(L1)})
    model = _packed_model(spec, plan)
    export_plan(model, plan, out=tmp_path / "ct", export_format="compressed-tensors", densify_sparse=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    _logits(loaded)
    for key in plan:
        module = model.get_submodule(key)
        assert isinstance(module, SparseLinear)
        assert torch.equal(loaded.get_submodule(key).weight, module.dequantized_weight())
        assert int((loaded.get_submodule(key).weight == 0).sum()) >= module.in_features * module.out_features // 2


# -- the directory: atomic, deterministic, verified, confined ----------------------------------------------------


def test_same_trial_twice_gives_the_same_manifest(spec: SessionSpec, tmp_path: Path) -> None:
    model = _packed_model(spec, MIXED)
    first = export_plan(model, MIXED, out=tmp_path / "one", provenance={"study": "s", "trial": 3})
    second = export_plan(_packed_model(spec, MIXED), MIXED, out=tmp_path / "two", provenance={"study": "s", "trial": 3})
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()
    assert first.manifest_sha256 == second.manifest_sha256
    assert {f.name for f in first.files} >= {"model.safetensors", "config.json", "plan.json", "budgetpress.json"}


def test_existing_targets_symlinks_and_escapes_are_refused(spec: SessionSpec, tmp_path: Path) -> None:
    model = _packed_model(spec, PORTABLE)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_plan(model, PORTABLE, out=taken)
    assert (taken / "keep.txt").read_text() == "mine"
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(ExportError, match="symlink"):
        export_plan(model, PORTABLE, out=tmp_path / "link")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "escape").symlink_to(outside)
    for bad in (root / ".." / "x", root / "escape" / "x", Path("/tmp") / "x"):
        with pytest.raises(ExportError, match="outside the export root"):
            export_plan(model, PORTABLE, out=bad, root=root)
    assert list(outside.iterdir()) == [] and not (tmp_path / "x").exists()
    export_plan(model, PORTABLE, out=root / "sub" / "ok", root=root)
    verify_export(root / "sub" / "ok")
    replaced = export_plan(model, PORTABLE, out=taken, overwrite=True)
    assert not (taken / "keep.txt").exists() and verify_export(taken)["plan_key"] == replaced.plan_key


def test_tampered_exports_fail_verification(spec: SessionSpec, tmp_path: Path) -> None:
    export_plan(_packed_model(spec, PORTABLE), PORTABLE, out=tmp_path / "e")
    weights = tmp_path / "e" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors does not match"):
        load_compressed(tmp_path / "e")
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (tmp_path / "e" / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ExportError, match="not in the manifest"):
        verify_export(tmp_path / "e")


def test_a_model_not_assembled_for_the_plan_is_refused(spec: SessionSpec, tmp_path: Path) -> None:
    dense = load_model(resolve_model(spec.model))
    with pytest.raises(ExportError, match="assemble the plan's packed modules first"):
        export_plan(dense, PORTABLE, out=tmp_path / "x")
    other = _packed_model(spec, MIXED)
    with pytest.raises(ExportError, match="not the plan's setting"):
        export_plan(other, Plan({f"{L0}.mlp.up_proj": LinearSetting(bits=8, group_size=128)}), out=tmp_path / "x")
    assert isinstance(other.get_submodule(f"{L0}.mlp.up_proj"), QuantLinear)
    with pytest.raises(ExportError, match="packed modules the plan leaves dense"):
        export_plan(other, Plan({k: s for k, s in MIXED.items() if k != f"{L0}.mlp.up_proj"}), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


_KILLER = r"""
import os, signal, sys
from pathlib import Path
import torch
import budgetpress.evaluators._export as export
import budgetpress.evaluators._export_dir as directory
from budgetpress.evaluators import load_model, resolve_model, apply_plan_
from budgetpress.space import LinearSetting, Plan

model_dir, out, stage = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
plan = Plan({"model.layers.0.mlp.up_proj": LinearSetting(bits=4, group_size=128)})
model = apply_plan_(load_model(resolve_model(model_dir)), plan)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

original_save, original_rename, original_fsync = export.save_file, os.rename, directory._fsync_path
if stage == "weights":
    export.save_file = lambda *a, **k: (original_save(*a, **k), die())
elif stage == "manifest":
    directory._fsync_path = lambda p: die() if p.name == "manifest.json" else original_fsync(p)
elif stage == "after-rename":
    os.rename = lambda a, b: (original_rename(a, b), die())
export.export_plan(model, plan, out=out)
"""


@pytest.mark.parametrize("stage", ["weights", "manifest", "after-rename", "none"])
def test_kill_9_leaves_the_target_absent_or_complete(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-c", _KILLER, "builtin", str(out), stage],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    killed = done.returncode == -signal.SIGKILL
    assert killed == (stage != "none"), done.stderr
    if stage in ("weights", "manifest"):
        assert not out.exists()
        assert [p.name.endswith(".partial") for p in tmp_path.iterdir()] == [True]
    else:
        assert verify_export(out)["export_format"] == "native"
        assert load_compressed(out) is not None
