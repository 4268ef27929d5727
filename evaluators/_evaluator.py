"""Evaluating plans on a resident model: assemble the plan's weights, run, compare to dense.

Each unit's variant at each setting is computed once and kept, so assembling a plan only swaps
weights in; the dense model's next-token distributions are computed once per token set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from budgetpress.evaluators._rtn import rtn_quantize
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

WeightMethod = Callable[[torch.Tensor, LinearSetting], torch.Tensor]


def rtn_weight(weight: torch.Tensor, setting: LinearSetting) -> torch.Tensor:
    """The weight a unit holds at ``setting`` under RTN, dequantized for the torch reference path."""
    if setting.sparsity or setting.rank is not None:
        raise ValueError(
            f"method 'rtn' makes bit-width variants only; setting {setting.label()} needs a sparsity or low-rank method"
        )
    return rtn_quantize(weight, bits=setting.bits, group_size=setting.group_size).dequantize()


WEIGHT_METHODS: dict[str, WeightMethod] = {"rtn": rtn_weight}


@torch.no_grad()
def next_token_log_probs(model: PreTrainedModel, tokens: torch.Tensor, *, chunk: int = 4) -> torch.Tensor:
    """Log-softmax of the model's logits for every position, float32 [n, seq_len - 1, vocab]."""
    parts = []
    for start in range(0, len(tokens), chunk):
        logits = model(input_ids=tokens[start : start + chunk]).logits[:, :-1].float()
        parts.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(parts)


def kl_and_ppl(dense_log_probs: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Mean per-token KL(dense ‖ compressed) in nats, and the compressed model's perplexity."""
    kl = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1).mean()
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    return float(kl), math.exp(min(float(nll), 700.0))


def _linear(model: PreTrainedModel, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"unit {name!r} is a {type(module).__name__}, not a linear layer")
    return module


class PlanEvaluator:
    """Holds one model resident and evaluates plans on it; not thread-safe (one per worker)."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        profile: ModelProfile,
        token_sets: dict[Split, torch.Tensor],
        workload: Workload,
        method: str = "rtn",
    ) -> None:
        if method not in WEIGHT_METHODS:
            raise ValueError(f"unknown weight method {method!r}; accepted: {', '.join(WEIGHT_METHODS)}")
        self._model = model
        self._profile = profile
        self._workload = workload
        self._method = WEIGHT_METHODS[method]
        self._modules = {u.key: _linear(model, u.key) for u in profile.linear_units}
        self._originals = {key: m.weight.detach().clone() for key, m in self._modules.items()}
        self._variants: dict[tuple[str, LinearSetting], torch.Tensor] = {}
        self._tokens = token_sets
        self._dense = {split: next_token_log_probs(model, tokens) for split, tokens in token_sets.items()}

    def _weight_for(self, key: str, setting: LinearSetting) -> torch.Tensor:
        if setting.is_dense:
            return self._originals[key]
        cached = self._variants.get((key, setting))
        if cached is None:
            cached = self._method(self._originals[key], setting).to(self._originals[key].dtype)
            self._variants[(key, setting)] = cached
        return cached

    def assemble_(self, plan: Plan) -> None:
        """Swap every linear unit's weight to its variant under ``plan`` (dense where unset)."""
        for key, module in self._modules.items():
            setting = plan.get(key, LinearSetting())
            if not isinstance(setting, LinearSetting):
                raise ValueError(f"unit {key!r} is a linear unit but the plan gives it {setting!r}")
            module.weight.data = self._weight_for(key, setting)

    def evaluate(self, plan: Plan, *, split: Split, max_tokens: int | None = None, worker: str = "") -> Result:
        started = time.perf_counter()
        tokens = self._tokens[split]
        dense = self._dense[split]
        n_sequences = len(tokens) if max_tokens is None else max(1, min(len(tokens), -(-max_tokens // tokens.shape[1])))
        self.assemble_(plan)
        log_probs = next_token_log_probs(self._model, tokens[:n_sequences])
        kl, ppl = kl_and_ppl(dense[:n_sequences], log_probs, tokens[:n_sequences, 1:])
        return Result(
            kl=kl,
            ppl=ppl,
            memory_bytes=plan_bytes(self._profile, plan, self._workload),
            tokens=int(tokens[:n_sequences, 1:].numel()),
            seconds=time.perf_counter() - started,
            split=split,
            worker=worker,
        )
