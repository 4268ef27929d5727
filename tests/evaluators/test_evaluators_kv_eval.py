"""The KV evaluation protocol on the built-in model: prefill, compress the cache, score the continuation."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from budgetpress.evaluators import load_model, next_token_log_probs, resolve_model
from budgetpress.evaluators._corpus import list_corpus_files, read_stream
from budgetpress.evaluators._data import _consecutive_windows
from budgetpress.evaluators._kv_eval import (
    KVSequences,
    KVTokenSets,
    KVTokenSpec,
    evaluate_kv,
    kv_continuation_log_probs,
    make_kv_token_sets,
    recall_accuracy,
)
from budgetpress.kernels import PlanKVCache
from budgetpress.space import EvictionPolicy, KVSetting, Plan

PREFILL = 384
SPEC = KVTokenSpec(
    prefill_len=PREFILL,
    continuation_len=128,
    calibration_sequences=4,
    evaluation_sequences=8,
    recall_fraction=0.5,
    seed=0,
)
N_LAYERS = 6
ALPHABET = 36  # recall keys and values are drawn from a-z0-9


def _uniform(setting: KVSetting) -> Plan:
    return Plan({f"kv.{layer}": setting for layer in range(N_LAYERS)})


def _evict(kept: int, policy: EvictionPolicy = EvictionPolicy.SINK_WINDOW) -> Plan:
    return _uniform(KVSetting(bits=16, kept_tokens=kept, policy=policy))


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return load_model(resolve_model("builtin"))


@pytest.fixture(scope="module")
def sets() -> KVTokenSets:
    return make_kv_token_sets(SPEC)


@pytest.fixture(scope="module")
def dense(model: PreTrainedModel, sets: KVTokenSets) -> torch.Tensor:
    return kv_continuation_log_probs(model, sets.evaluation.tokens, prefill_len=PREFILL, plan=Plan({}))


def _recall_rows_kl(dense: torch.Tensor, log_probs: torch.Tensor, sequences: KVSequences) -> tuple[float, float]:
    """Mean KL per token on recall rows and on plain windows."""
    kl = (dense.exp() * (dense - log_probs)).sum(-1).mean(-1)
    recall = sequences.answer_mask.any(dim=1)
    return float(kl[recall].mean()), float(kl[~recall].mean())


def test_dense_protocol_equals_a_plain_forward(model: PreTrainedModel, sets: KVTokenSets, dense: torch.Tensor) -> None:
    tokens = sets.evaluation.tokens
    assert dense.shape == (len(tokens), tokens.shape[1] - PREFILL - 1, 256)
    plain = next_token_log_probs(model, tokens)[:, PREFILL:]
    torch.testing.assert_close(dense, plain, atol=1e-4, rtol=0)
    # Batches that do not divide the rows, and a factory of caches, give the same rows.
    uneven = kv_continuation_log_probs(
        model, tokens, prefill_len=PREFILL, plan=lambda: PlanKVCache.from_plan(Plan({}), n_layers=N_LAYERS), chunk=3
    )
    torch.testing.assert_close(uneven, dense, atol=1e-4, rtol=0)
    result = evaluate_kv(model, sets.evaluation, Plan({}), dense_log_probs=dense)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.tokens == len(tokens) * (tokens.shape[1] - PREFILL - 1)
    assert result.answer_tokens == 4 * 20  # 4 recall rows, 5 queries of 4 bytes each


def test_bf16_cache_keeps_full_precision_tokens_in_bf16(sets: KVTokenSets) -> None:
    model = load_model(resolve_model("builtin"), dtype=torch.bfloat16)
    tokens = sets.evaluation.tokens[:2]
    caches: list[PlanKVCache] = []

    def factory() -> PlanKVCache:
        caches.append(PlanKVCache.from_plan(_uniform(KVSetting(bits=4)), n_layers=N_LAYERS))
        return caches[-1]

    kv_continuation_log_probs(model, tokens, prefill_len=PREFILL, plan=factory)
    layer = caches[0].plan_layers[0]
    assert layer.full is not None and layer.full.keys.dtype == torch.bfloat16
    assert layer.n_quantized > 0
    dense = kv_continuation_log_probs(model, tokens, prefill_len=PREFILL, plan=Plan({}))
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense, next_token_log_probs(model, tokens)[:, PREFILL:], atol=2e-2, rtol=0)


def test_kl_grows_as_kv_bits_fall(model: PreTrainedModel, sets: KVTokenSets, dense: torch.Tensor) -> None:
    kls = [
        evaluate_kv(model, sets.evaluation, _uniform(KVSetting(bits=b)), dense_log_probs=dense).kl
        for b in (16, 8, 4, 2)
    ]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)
    assert kls[0] < kls[1] < kls[2] < kls[3]
    assert kls[3] > 5 * kls[2] > 0


def test_recall_rows_lose_their_table_as_budgets_shrink(
    model: PreTrainedModel, sets: KVTokenSets, dense: torch.Tensor
) -> None:
    """The table at the start of a recall row drives the structure of its queries: evicting it costs.

    Plain windows barely notice the same budgets, so the loss comes from what lies far back.
    """
    evaluation = sets.evaluation
    kls = {}
    for kept in (320, 256, 96, 32):
        log_probs = kv_continuation_log_probs(model, evaluation.tokens, prefill_len=PREFILL, plan=_evict(kept))
        kls[kept] = _recall_rows_kl(dense, log_probs, evaluation)
    recall_kl = {kept: pair[0] for kept, pair in kls.items()}
    assert 0.1 < recall_kl[320] < recall_kl[256]
    assert recall_kl[256] > 0.5
    assert min(recall_kl[96], recall_kl[32]) > 0.8 * recall_kl[256]
    assert recall_kl[256] > 20 * kls[256][1]  # plain windows at the same budget


def test_recall_accuracy_falls_as_budget_shrinks(
    model: PreTrainedModel, sets: KVTokenSets, dense: torch.Tensor
) -> None:
    evaluation = sets.evaluation
    full = recall_accuracy(dense, evaluation.tokens, evaluation.answer_mask, PREFILL)
    # With the whole cache the model looks the values up (chance is 1/36)...
    assert full > 5 / ALPHABET
    accuracies = [full]
    for kept in (256, 96, 32):
        log_probs = kv_continuation_log_probs(model, evaluation.tokens, prefill_len=PREFILL, plan=_evict(kept))
        accuracies.append(recall_accuracy(log_probs, evaluation.tokens, evaluation.answer_mask, PREFILL))
    # ... and loses them as the budget evicts the table: at 32 kept tokens it is back to guessing.
    assert all(later <= earlier + 0.05 for earlier, later in itertools.pairwise(accuracies))
    assert accuracies[0] > accuracies[-1] + 0.2
    assert accuracies[-1] < 3 / ALPHABET


def test_snapkv_keeps_the_table_better_than_sink_window(
    model: PreTrainedModel, sets: KVTokenSets, dense: torch.Tensor
) -> None:
    evaluation = sets.evaluation
    recall_kl = {}
    for policy in (EvictionPolicy.SINK_WINDOW, EvictionPolicy.SNAPKV):
        log_probs = kv_continuation_log_probs(model, evaluation.tokens, prefill_len=PREFILL, plan=_evict(256, policy))
        recall_kl[policy] = _recall_rows_kl(dense, log_probs, evaluation)[0]
    assert recall_kl[EvictionPolicy.SNAPKV] < 0.75 * recall_kl[EvictionPolicy.SINK_WINDOW]


def test_recall_accuracy_counts_argmax_hits_after_the_prefill() -> None:
    tokens = torch.tensor([[5, 6, 7, 8, 9, 1], [1, 2, 3, 4, 5, 6]])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 4:] = True  # predicted by continuation rows 1 and 2 (prefill 2: rows predict tokens 3..5)
    mask[1, 1] = True  # inside the prefill: not scored
    log_probs = torch.full((2, 3, 10), -5.0)
    log_probs[0, 1, 9] = 0.0  # hit
    log_probs[0, 2, 3] = 0.0  # miss (the target is 1)
    assert recall_accuracy(log_probs, tokens, mask, 2) == pytest.approx(0.5)
    assert math.isnan(recall_accuracy(log_probs, tokens, torch.zeros_like(mask), 2))


def test_sequences_are_deterministic_from_the_seed(sets: KVTokenSets) -> None:
    again = make_kv_token_sets(SPEC)
    for split in (again.calibration, again.evaluation):
        original = sets.calibration if split is again.calibration else sets.evaluation
        assert torch.equal(split.tokens, original.tokens) and torch.equal(split.answer_mask, original.answer_mask)
    other = make_kv_token_sets(KVTokenSpec(**{**SPEC.__dict__, "seed": 1}))
    assert not torch.equal(other.calibration.tokens, sets.calibration.tokens)
    assert not torch.equal(other.evaluation.tokens, sets.evaluation.tokens)  # its recall rows differ


def test_calibration_and_evaluation_sequences_differ(sets: KVTokenSets) -> None:
    calibration, evaluation = sets.calibration, sets.evaluation
    assert calibration.tokens.shape == (4, 512) and evaluation.tokens.shape == (8, 512)
    assert not (calibration.tokens.unsqueeze(1) == evaluation.tokens.unsqueeze(0)).all(-1).any()
    # Recall rows interleave with plain ones; plain evaluation rows are consecutive held-out windows.
    recall_rows = evaluation.answer_mask.any(dim=1)
    assert recall_rows.tolist() == [False, True] * 4
    files = list_corpus_files()
    heldout = _consecutive_windows(read_stream(files.root, files.heldout), n=8, seq_len=512)
    assert torch.equal(evaluation.tokens[~recall_rows], heldout[~recall_rows])


def test_recall_tables_lie_in_the_prefill_and_answers_in_the_continuation(sets: KVTokenSets) -> None:
    for sequences in (sets.calibration, sets.evaluation):
        for tokens, mask in zip(sequences.tokens, sequences.answer_mask, strict=True):
            answers = mask.nonzero().flatten()
            if len(answers) == 0:
                continue
            assert int(answers.min()) > PREFILL
            data = bytes(tokens.tolist())
            assert data.startswith(b"\x00# recall\n")
            for start in answers[::4].tolist():
                assert 0 <= data.find(data[start : start + 4]) < PREFILL - 4


def test_text_files_give_plain_windows(model: PreTrainedModel, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    spec = KVTokenSpec(
        prefill_len=64, continuation_len=32, calibration_sequences=3, evaluation_sequences=2, text_files=(str(source),)
    )
    sets = make_kv_token_sets(spec)
    assert sets.calibration.tokens.shape == (3, 96) and sets.evaluation.tokens.shape == (2, 96)
    assert not sets.calibration.answer_mask.any() and not sets.evaluation.answer_mask.any()
    result = evaluate_kv(model, sets.evaluation, _evict(16))
    assert result.recall_accuracy is None and result.answer_tokens == 0
    assert result.tokens == 2 * 31 and result.kl > 0


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="continuation_len"):
        make_kv_token_sets(
            KVTokenSpec(
                prefill_len=448,
                continuation_len=64,
                calibration_sequences=2,
                evaluation_sequences=2,
                recall_fraction=1.0,
            )
        )
    with pytest.raises(ValueError, match="continuation_len >= 2"):
        KVTokenSpec(continuation_len=1)
    with pytest.raises(ValueError, match="recall_fraction"):
        KVTokenSpec(recall_fraction=1.5)
