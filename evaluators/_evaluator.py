"""Evaluating plans on a resident model: assemble the plan from the level store, run, compare to dense.

Weights are scored by teacher-forced next-token KL on token windows. When the search space has KV
settings, every evaluation also runs the KV protocol (prefill a long context, compress the cache
per the plan, score the continuation with the compressed cache), so that plans with and without
KV compression are scored on the same tokens; both in one evaluation when a plan sets both. The
dense model's distributions are computed once per token set.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers import PreTrainedModel

from budgetpress.evaluators._kv_eval import KVSequences, KVTokenSets, evaluate_kv, kv_continuation_log_probs
from budgetpress.evaluators._metrics import kl_and_ppl, next_token_log_probs
from budgetpress.evaluators._store import LevelStore
from budgetpress.kernels import Backend, backend_for
from budgetpress.space import (
    LinearSetting,
    ModelProfile,
    Plan,
    Result,
    Split,
    Workload,
    plan_bytes,
)

logger = logging.getLogger(__name__)


def _linear(model: PreTrainedModel, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"unit {name!r} is a {type(module).__name__}, not a linear layer")
    return module


class _DequantizedAssembly:
    """The reference backend's assembly: each stored variant runs as the weight its packed module
    dequantizes to, computed once per variant. The reference op dequantizes and multiplies on every
    call; this does the same multiplication without repeating the unpacking."""

    def __init__(self, model: PreTrainedModel, profile: ModelProfile, store: LevelStore) -> None:
        self._store = store
        self._modules = {u.key: _linear(model, u.key) for u in profile.linear_units}
        self._originals = {key: m.weight.detach().clone() for key, m in self._modules.items()}
        self._variants: dict[tuple[str, LinearSetting], torch.Tensor] = {}

    def _weight_for(self, key: str, setting: LinearSetting) -> torch.Tensor:
        if setting.is_dense:
            return self._originals[key]
        cached = self._variants.get((key, setting))
        if cached is None:
            packed = self._store.module(key, setting)
            original = self._originals[key]
            cached = packed.dequantized_weight().to(original.device, original.dtype)  # type: ignore[operator]
            self._variants[(key, setting)] = cached
        return cached

    def assemble_(self, plan: Plan) -> None:
        for key, module in self._modules.items():
            setting = plan.get(key, LinearSetting())
            if not isinstance(setting, LinearSetting):
                raise ValueError(f"unit {key!r} is a linear unit but the plan gives it {setting!r}")
            module.weight.data = self._weight_for(key, setting)


class PlanEvaluator:
    """Holds one model resident and evaluates plans on it; not thread-safe (one per worker).

    Plans are assembled from ``store`` (never recompressed): on a GPU the packed modules run on
    their Triton kernels; elsewhere as their dequantized weights (the reference ops' arithmetic).
    ``kv_sets`` turns on the KV protocol for every evaluation.
    """

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        profile: ModelProfile,
        token_sets: dict[Split, torch.Tensor],
        workload: Workload,
        store: LevelStore,
        kv_sets: KVTokenSets | None = None,
    ) -> None:
        self._model = model
        self._profile = profile
        self._workload = workload
        self._store = store
        self._packed = backend_for(model.device) is Backend.TRITON
        self._reference = None if self._packed else _DequantizedAssembly(model, profile, store)
        self._tokens = token_sets
        self._dense = {split: next_token_log_probs(model, tokens) for split, tokens in token_sets.items()}
        self._kv_sets = kv_sets
        self._kv_dense = {} if kv_sets is None else {s: self._kv_reference(kv_sets.for_split(s)) for s in Split}

    def _kv_reference(self, sequences: KVSequences) -> torch.Tensor:
        tokens, prefill = sequences.tokens, sequences.prefill_len
        return kv_continuation_log_probs(self._model, tokens, prefill_len=prefill, plan=Plan({}))

    @property
    def model(self) -> PreTrainedModel:
        """The resident model, assembled to the last plan evaluated."""
        return self._model

    def tokens(self, split: Split) -> torch.Tensor:
        """The weight-scoring windows of ``split`` (int64 [n, seq_len])."""
        return self._tokens[split]

    def assemble_(self, plan: Plan) -> None:
        """Swap every linear unit to its stored variant under ``plan`` (dense where unset)."""
        if self._reference is not None:
            self._reference.assemble_(plan)
        else:
            self._store.assemble_(self._model, plan)

    def evaluate(self, plan: Plan, *, split: Split, max_tokens: int | None = None, worker: str = "") -> Result:
        """Score ``plan`` on ``split``; ``max_tokens`` (the fidelity) caps the tokens scored."""
        started = time.perf_counter()
        tokens = self._tokens[split]
        n_sequences = len(tokens) if max_tokens is None else max(1, min(len(tokens), -(-max_tokens // tokens.shape[1])))
        self.assemble_(plan)
        log_probs = next_token_log_probs(self._model, tokens[:n_sequences])
        kl, ppl = kl_and_ppl(self._dense[split][:n_sequences], log_probs, tokens[:n_sequences, 1:])
        scored = int(tokens[:n_sequences, 1:].numel())
        extra: dict[str, float] = {"weight_kl": kl}
        if self._kv_sets is not None:
            kl, scored = self._with_kv(plan, split, n_sequences / len(tokens), kl, scored, extra)
        return Result(
            kl=kl,
            ppl=ppl,
            memory_bytes=plan_bytes(self._profile, plan, self._workload),
            tokens=scored,
            seconds=time.perf_counter() - started,
            split=split,
            worker=worker,
            fidelity=max_tokens,
            extra=tuple(sorted(extra.items())),
        )

    def _with_kv(
        self, plan: Plan, split: Split, fraction: float, kl: float, scored: int, extra: dict[str, float]
    ) -> tuple[float, int]:
        """Add the KV protocol's continuation tokens: the token-weighted KL of both sets."""
        assert self._kv_sets is not None
        sequences = self._kv_sets.for_split(split)
        n_kv = max(1, round(fraction * len(sequences)))
        kv = evaluate_kv(self._model, sequences.head(n_kv), plan, dense_log_probs=self._kv_dense[split][:n_kv])
        extra.update(kv_kl=kv.kl, kv_ppl=kv.ppl)
        if kv.recall_accuracy is not None:
            extra["recall_accuracy"] = kv.recall_accuracy
        total = scored + kv.tokens
        return (kl * scored + kv.kl * kv.tokens) / total, total
