"""Per-linear input statistics from calibration tokens: the Hessians and norms the methods take.

One forward pass over the calibration set feeds every hooked linear. Linears that read the very
same input tensor (q/k/v, gate/up) share one accumulator, which saves a third to a half of the
work and memory; the statistics they get are the same object.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class InputStats:
    """Sums over calibration tokens of one linear's inputs x [in]: X^T X and the squared norms.

    ``xtx`` is None when only the per-column norms were collected (enough for Wanda).
    """

    xtx: torch.Tensor | None  # float32 [in, in], sum over tokens of x x^T
    sq_norms: torch.Tensor  # float32 [in], sum over tokens of x_j^2
    n_tokens: int

    @property
    def in_features(self) -> int:
        return int(self.sq_norms.shape[0])

    def check_for(self, in_features: int) -> None:
        """Refuse statistics of another layer's width, or of no tokens at all (every input dead)."""
        if self.in_features != in_features:
            raise ValueError(f"statistics are for {self.in_features} inputs; the weight has {in_features}")
        if self.n_tokens == 0:
            raise ValueError("the statistics hold no calibration tokens")

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / n (float32 [in, in]); the factor 2 keeps the papers' scale."""
        if self.xtx is None:
            raise ValueError("these statistics hold column norms only; collect them with hessian=True")
        return self.xtx * (2.0 / max(self.n_tokens, 1))

    def column_norms(self) -> torch.Tensor:
        """||x_j||_2 over all calibration tokens (float32 [in]), Wanda's activation factor."""
        return self.sq_norms.sqrt()

    @classmethod
    def from_activations(cls, x: torch.Tensor, *, hessian: bool = True) -> InputStats:
        """Statistics of activations [..., in] at once (tests, or callers that hold X)."""
        accumulator = InputStatsAccumulator(int(x.shape[-1]), hessian=hessian)
        accumulator.add(x)
        return accumulator.result()


class InputStatsAccumulator:
    """Adds activations [..., in] batch by batch; ``result()`` gives the InputStats so far."""

    def __init__(self, in_features: int, *, hessian: bool = True) -> None:
        self.in_features = in_features
        self.keeps_hessian = hessian
        # Allocated at the first batch, on its device: sums are made where the activations are.
        self._xtx: torch.Tensor | None = None
        self._sq_norms: torch.Tensor | None = None
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activations have {x.shape[-1]} features; this accumulator takes {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).float()
        if self._sq_norms is None:
            self._sq_norms = torch.zeros(self.in_features, device=rows.device)
            if self.keeps_hessian:
                self._xtx = torch.zeros(self.in_features, self.in_features, device=rows.device)
        if self._xtx is not None:
            self._xtx.addmm_(rows.T, rows)
        self._sq_norms.add_(rows.pow(2).sum(dim=0))
        self.n_tokens += int(rows.shape[0])

    def result(self) -> InputStats:
        """The sums so far (zeros on the CPU before any batch), on the activations' device."""
        if self._sq_norms is None:
            xtx = torch.zeros(self.in_features, self.in_features) if self.keeps_hessian else None
            return InputStats(xtx=xtx, sq_norms=torch.zeros(self.in_features), n_tokens=0)
        xtx = None if self._xtx is None else self._xtx.clone()
        return InputStats(xtx=xtx, sq_norms=self._sq_norms.clone(), n_tokens=self.n_tokens)


class _SharedAccumulator:
    """One accumulator for the linears that read one input tensor; adds each tensor once."""

    def __init__(self, in_features: int, *, hessian: bool) -> None:
        self.accumulator = InputStatsAccumulator(in_features, hessian=hessian)
        self.last: torch.Tensor | None = None
        self.adds = 0
        self.calls: dict[str, int] = {}

    def offer(self, name: str, x: torch.Tensor) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if x is not self.last:
            self.accumulator.add(x)
            self.last = x
            self.adds += 1


class _Collector:
    """Forward pre-hooks that route each linear's input to its (possibly shared) accumulator."""

    def __init__(self, *, hessian: bool) -> None:
        self.hessian = hessian
        self.by_name: dict[str, _SharedAccumulator] = {}
        self._previous: tuple[torch.Tensor, _SharedAccumulator] | None = None

    def hook(self, name: str, module: nn.Linear) -> torch.utils.hooks.RemovableHandle:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.offer(name, module.in_features, args[0] if args else kwargs["input"])

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def offer(self, name: str, in_features: int, x: torch.Tensor) -> None:
        shared = self.by_name.get(name)
        if shared is None:
            # A linear's first call joins the previous linear's accumulator when it reads the very
            # same tensor object (siblings such as q/k/v); otherwise it starts its own.
            previous = self._previous
            if previous is not None and previous[0] is x:
                shared = previous[1]
            else:
                shared = _SharedAccumulator(in_features, hessian=self.hessian)
            self.by_name[name] = shared
        shared.offer(name, x)
        self._previous = (x, shared)

    def results(self) -> dict[str, InputStats]:
        done: dict[int, InputStats] = {}
        stats: dict[str, InputStats] = {}
        for name, shared in self.by_name.items():
            # A linear that once shared an input but later read a different one would have had
            # other tensors folded into its statistics: refuse rather than return wrong sums.
            if any(count != shared.adds for count in shared.calls.values()):
                raise RuntimeError(
                    f"linear {name!r} shared its input with {sorted(shared.calls)} in the first batch "
                    "but not in later ones; collect their statistics separately"
                )
            if id(shared) not in done:
                done[id(shared)] = shared.accumulator.result()
            stats[name] = done[id(shared)]
        return stats


def _linears(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear]:
    if names is None:
        return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    found: dict[str, nn.Linear] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")
        found[name] = module
    return found


@torch.no_grad()
def collect_input_stats(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    *,
    names: Iterable[str] | None = None,
    batch_size: int = 8,
    hessian: bool = True,
) -> dict[str, InputStats]:
    """Input statistics of the named linears (all nn.Linear modules if None) over ``token_ids``.

    ``token_ids`` is int64 [n, seq_len] of full windows (no padding). One pass over the dense
    model; every linear sees the dense model's activations. ``hessian=False`` keeps only the
    per-column squared norms (O(in) memory instead of O(in^2)).
    """
    if token_ids.ndim != 2 or len(token_ids) == 0:
        raise ValueError(f"token_ids must be a non-empty [n, seq_len] tensor; got shape {tuple(token_ids.shape)}")
    linears = _linears(model, names)
    collector = _Collector(hessian=hessian)
    handles = [collector.hook(name, module) for name, module in linears.items()]
    try:
        for start in range(0, len(token_ids), batch_size):
            model(input_ids=token_ids[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(collector.by_name))
    if missing:
        raise RuntimeError(f"linears {missing} were never called in the model's forward pass")
    return collector.results()
