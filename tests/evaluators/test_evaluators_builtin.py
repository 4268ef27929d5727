"""The committed built-in model matches its manifest, and its recipe reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from budgetpress.evaluators import BUILTIN_DIR, PRESETS, read_manifest
from budgetpress.evaluators._builtin import build_model, file_sha256, train_steps
from budgetpress.evaluators._corpus import list_corpus_files, read_stream, stream_sha256

MANIFEST = read_manifest(BUILTIN_DIR)


def test_committed_weights_match_manifest() -> None:
    assert file_sha256(BUILTIN_DIR / MANIFEST["weights_file"]) == MANIFEST["weights_sha256"]


def test_committed_model_meets_the_mission_shape() -> None:
    config = json.loads((BUILTIN_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 256
    assert config["num_hidden_layers"] >= 6
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert 4_000_000 <= MANIFEST["n_params"] <= 8_000_000
    assert (BUILTIN_DIR / MANIFEST["weights_file"]).stat().st_size <= 25_000_000
    assert MANIFEST["heldout_bits_per_byte"] <= 2.8


def test_every_linear_width_divisible_by_128() -> None:
    from budgetpress.evaluators import profile_source, resolve_model

    profile = profile_source(resolve_model("builtin"))
    assert len(profile.linear_units) == 7 * profile.n_layers
    for unit in profile.linear_units:
        assert unit.in_features % 128 == 0 and unit.out_features % 128 == 0, unit.key


def _same_corpus() -> bool:
    files = list_corpus_files()
    return list(files.train) == MANIFEST["corpus"]["train_files"]


@pytest.mark.skipif(not _same_corpus(), reason="this interpreter's standard library differs from the recipe's")
def test_recipe_reproduces_first_training_steps() -> None:
    files = list_corpus_files()
    stream = read_stream(files.root, files.train)
    assert stream_sha256(stream) == MANIFEST["corpus"]["train_sha256"]
    recipe = PRESETS["full"]
    assert recipe.steps == MANIFEST["recipe"]["steps"]
    losses = train_steps(build_model(recipe), recipe, stream, n_steps=2)
    # bf16 autocast on CPU: equal up to the reduction order of the machine's kernels.
    assert losses == pytest.approx(MANIFEST["first_losses"][:2], rel=2e-3)


def test_micro_training_is_deterministic(micro_model_dir: Path) -> None:
    from budgetpress.evaluators import train_builtin

    first = read_manifest(micro_model_dir)
    again = train_builtin(
        preset="micro", out_dir=micro_model_dir.parent / "micro-again", steps=first["recipe"]["steps"]
    )
    assert again["first_losses"] == pytest.approx(first["first_losses"], rel=1e-5)
    assert again["weights_sha256"] == first["weights_sha256"]


def test_micro_model_loads_with_plain_transformers(micro_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir, local_files_only=True)
    text = "import os\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 256)


def test_default_workload_kv_share_is_like_a_real_model() -> None:
    from budgetpress.evaluators import profile_source, resolve_model
    from budgetpress.space import Plan, Workload, dense_bytes, plan_memory

    profile = profile_source(resolve_model("builtin"))
    memory = plan_memory(profile, Plan({}), Workload())
    assert memory.total == dense_bytes(profile, Workload())
    assert 0.05 <= memory.kv_bytes / memory.total <= 0.15


def test_the_lookup_phase_continues_a_first_phase_checkpoint_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training both phases in one go, or the lookup phase from the first phase's checkpoint, gives
    the same weights: that is how the committed model was made from its first-phase checkpoint."""
    import dataclasses

    from budgetpress.evaluators import _builtin, train_builtin

    both = train_builtin(preset="micro", out_dir=tmp_path / "both")
    micro = PRESETS["micro"]
    monkeypatch.setitem(_builtin.PRESETS, "micro", dataclasses.replace(micro, lookup=None))
    first = train_builtin(preset="micro", out_dir=tmp_path / "first")
    assert first["lookup"] is None
    monkeypatch.setitem(_builtin.PRESETS, "micro", micro)
    continued = train_builtin(preset="micro", out_dir=tmp_path / "continued", first_phase_from=tmp_path / "first")
    assert continued["weights_sha256"] == both["weights_sha256"]
    assert continued["lookup"]["from_weights_digest"] == both["lookup"]["from_weights_digest"]
    assert continued["first_phase_weights_sha256"] == first["weights_sha256"]
    with pytest.raises(ValueError, match="lookup phase already"):
        train_builtin(preset="micro", out_dir=tmp_path / "twice", first_phase_from=tmp_path / "both")


def test_the_committed_model_recalls_after_its_lookup_phase() -> None:
    lookup = MANIFEST["lookup"]
    assert lookup is not None
    assert lookup["recall_accuracy_before"] < 0.06  # chance is 1/36: the first phase never learned it
    assert lookup["recall_accuracy"] > 0.15
