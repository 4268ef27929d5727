"""A transformers ``Cache`` whose layers each keep their KV at their own bits and token budget.

Layout of one layer holding ``t`` tokens — what ``space.kv_bytes`` counts, to the byte. At 16 bits every
token is kept in the states' dtype. Otherwise ``q = ((t - 32) // 32) * 32`` tokens (0 if ``t <= 32``) are
quantized (KIVI, see ``_kv_quant``) and ``f = t - q`` stay full precision: new tokens enter the
full-precision part, and whenever it would reach ``KV_RESIDUAL + KV_GROUP`` (64) tokens its oldest 32 are
quantized as one group. The full-precision part is stored in the states' dtype, so the bytes equal
``kv_bytes`` when the model runs in a 16-bit dtype. Each held token's absolute index (int32) and, for
SnapKV, its score are kept beside it as bookkeeping; they are not KV bytes and are not counted.

Eviction (``kept_tokens`` = budget ``K``), after a prefill of ``t`` tokens the layer holds exactly
``min(K, t)``:

* ``sink_window``: the first ``min(sink_tokens, K - 1)`` tokens (attention sinks) plus the most recent ones.
  Sinks are pinned in the full-precision part (never quantized; the bytes are the same), so a quantized
  group never holds a sink.
* ``snapkv``: at the end of a prefill the last ``snapkv_window`` queries attend over every token; their
  attention, summed over those queries and over the query heads of each KV head and average-pooled over
  ``snapkv_kernel`` neighbouring tokens, scores each token; the window is kept and the best-scored earlier
  tokens fill the rest, separately per (batch row, KV head). Needs the queries: wire the model with
  ``use_plan_kv_attention_``.

Decode rule (one new token over the budget; the new token joins the full-precision part, one unit is
evicted, then the part is flushed as above, so the layout stays the one above for the count held):

* ``snapkv``: exactly one full-precision token goes, the lowest-scored outside the most recent
  ``snapkv_window`` (tokens added after the prefill score 0, so generated tokens that have aged out of
  that window go before SnapKV's picks; ties go oldest first). The layer keeps holding exactly ``K``;
  its quantized picks stay.
* ``sink_window``: the oldest non-sink token. When the layer holds quantized groups that token is in the
  oldest group, and dropping one token would split the group's shared per-channel key scales, so the
  whole group of 32 goes: the layer holds ``K - 31`` and refills. Without quantized groups (16 bits, or
  ``K < 64``) exactly one token goes.

A layer never holds more than ``K`` tokens once an update returns.

Positions: ``get_seq_length`` reports the tokens seen, so new positions continue after eviction.
``get_mask_sizes(q)`` returns ``(held + q, seen - held)``: the keys the layer presents, offset so that their
absolute span ends at the current token. A multi-token step on a non-empty layer that must evict re-lays
out the kept tokens; survivors that were quantized are quantized again from their dequantized values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, LinearAttentionCacheLayerMixin

from budgetpress.kernels._kv_quant import QuantizedKV
from budgetpress.space import KV_GROUP, KV_RESIDUAL, EvictionPolicy, KVSetting, Plan

logger = logging.getLogger(__name__)

SINK_TOKENS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 7

TensorMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class HeldTokens:
    """Tokens of one layer, ``[B, H, n, ...]``: keys, values, absolute indices and eviction scores."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor  # int32 [B, H, n]
    scores: torch.Tensor  # float32 [B, H, n]

    @property
    def n(self) -> int:
        return int(self.keys.shape[2])

    def cat(self, other: HeldTokens) -> HeldTokens:
        return self.map2(other, lambda a, b: torch.cat([a, b], dim=2))

    def map2(self, other: HeldTokens, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> HeldTokens:
        return HeldTokens(
            fn(self.keys, other.keys),
            fn(self.values, other.values),
            fn(self.index, other.index),
            fn(self.scores, other.scores),
        )

    def map(self, fn: TensorMap) -> HeldTokens:
        return HeldTokens(fn(self.keys), fn(self.values), fn(self.index), fn(self.scores))

    def slice(self, start: int, stop: int) -> HeldTokens:
        return self.map(lambda t: t[:, :, start:stop])

    def take(self, positions: torch.Tensor) -> HeldTokens:
        """The tokens at ``positions`` (int64 ``[B, H, m]``), per batch row and head."""

        def gather(t: torch.Tensor) -> torch.Tensor:
            index = positions.view(*positions.shape, *([1] * (t.ndim - 3)))
            return torch.gather(t, 2, index.expand(*positions.shape, *t.shape[3:]))

        return self.map(gather)

    def drop(self, positions: torch.Tensor) -> HeldTokens:
        """All tokens but one per (batch row, head): ``positions`` is int64 ``[B, H]``."""
        batch, heads = positions.shape
        keep = torch.arange(self.n, device=positions.device).expand(batch, heads, self.n) != positions.unsqueeze(-1)
        order = torch.arange(self.n, device=positions.device).expand(batch, heads, self.n)
        return self.take(order[keep].view(batch, heads, self.n - 1))


def _empty_tokens(like: torch.Tensor) -> HeldTokens:
    batch, heads, _, head_dim = like.shape
    empty = like.new_zeros(batch, heads, 0, head_dim)
    indices = torch.zeros(batch, heads, 0, dtype=torch.int32, device=like.device)
    return HeldTokens(empty, empty.clone(), indices, torch.zeros(batch, heads, 0, device=like.device))


class PlanKVLayer(CacheLayerMixin):
    """One layer's KV cache under a ``KVSetting``; see the module docstring for layout and eviction."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        setting: KVSetting,
        *,
        sink_tokens: int = SINK_TOKENS,
        snapkv_window: int = SNAPKV_WINDOW,
        snapkv_kernel: int = SNAPKV_KERNEL,
    ) -> None:
        super().__init__()
        if sink_tokens < 0 or snapkv_window < 1 or snapkv_kernel < 1 or snapkv_kernel % 2 == 0:
            raise ValueError(
                "sink_tokens must be >= 0, snapkv_window >= 1 and snapkv_kernel a positive odd number; got "
                f"{sink_tokens}, {snapkv_window}, {snapkv_kernel}"
            )
        self.setting = setting
        self.budget = setting.kept_tokens
        self.snapkv_window = snapkv_window
        self.snapkv_kernel = snapkv_kernel
        sinks = setting.policy is EvictionPolicy.SINK_WINDOW and self.budget is not None
        # At least one slot stays for the most recent token, whatever the budget.
        self.n_sinks = min(sink_tokens, self.budget - 1) if sinks and self.budget is not None else 0
        self.cumulative_length = 0
        # Set by the wired attention function (use_plan_kv_attention_) around each forward of this layer.
        self.deferred = False
        self._clear()

    def _clear(self) -> None:
        self.full: HeldTokens | None = None
        self.quantized: QuantizedKV | None = None
        self.quantized_meta: HeldTokens | None = None  # index and scores of the quantized tokens; no states
        self._pending: tuple[HeldTokens, int] | None = None

    @property
    def bits(self) -> int:
        return self.setting.bits

    @property
    def policy(self) -> EvictionPolicy:
        return self.setting.policy

    def __repr__(self) -> str:
        return f"PlanKVLayer({self.setting.label()}, seen={self.cumulative_length}, held={self.held_tokens})"

    # -- transformers' layer interface -------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.full = _empty_tokens(key_states)
        self.keys, self.values = self.full.keys, self.full.values
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take new states ``[B, H, n, D]``; return the keys and values the attention should see.

        Wired (``deferred``), the attention function reads this layer itself, so the new states are only
        passed through: one token is stored at once (decode attends over what the layer holds), several
        wait for :meth:`commit_prefill` (prefill attends at full precision, and SnapKV needs the queries).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError("a prefill of this layer is still waiting for commit_prefill from the attention")
        new = self._new_tokens(key_states, value_states)
        if self.deferred:
            if new.n == 1:
                self._commit(new)
            else:
                self._pending = (self.held(key_states.dtype).cat(new), self.held_tokens)
            return key_states, value_states
        held = self.held(key_states.dtype)
        if self.policy is EvictionPolicy.SNAPKV and new.n > 1 and self._over_budget(new.n):
            raise ValueError(
                "snapkv eviction scores tokens with the prompt's queries, which a cache update does not get; "
                "wire the model first with budgetpress.kernels.use_plan_kv_attention_(model)"
            )
        self._commit(new)
        return torch.cat([held.keys, key_states], dim=2), torch.cat([held.values, value_states], dim=2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_tokens
        return held + query_length, self.cumulative_length - held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.keys = self.values = None
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # is_croppable is False, so transformers never asks; a direct call gets a clear refusal.
        raise ValueError(
            "a PlanKVLayer cannot be cropped (quantized and evicted tokens cannot be restored); "
            "use a DynamicCache for assisted or speculative decoding"
        )

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        self._map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_tensors(lambda t: t.to(self.device, non_blocking=True))

    # -- what the layer holds -----------------------------------------------------------------------------

    @property
    def held_tokens(self) -> int:
        full = 0 if self.full is None else self.full.n
        return full + (0 if self.quantized is None else self.quantized.n_tokens)

    @property
    def n_quantized(self) -> int:
        return 0 if self.quantized is None else self.quantized.n_tokens

    def held_bytes(self) -> int:
        """Bytes of the K/V this layer holds: packed codes, scales and zeros, full-precision states."""
        full = 0 if self.full is None else sum(t.numel() * t.element_size() for t in (self.full.keys, self.full.values))
        return full + (0 if self.quantized is None else self.quantized.held_bytes())

    def token_index(self) -> torch.Tensor:
        """Absolute index (int32 ``[B, H, held]``) of each held token, in storage order: quantized, then full."""
        if self.full is None:
            raise RuntimeError("the layer holds nothing yet")
        if self.quantized_meta is None:
            return self.full.index
        return torch.cat([self.quantized_meta.index, self.full.index], dim=2)

    def held(self, dtype: torch.dtype | None = None) -> HeldTokens:
        """Every held token, quantized ones dequantized to ``dtype``, in storage order."""
        if self.full is None:
            raise RuntimeError("the layer holds nothing yet")
        if self.quantized is None or self.quantized_meta is None:
            return self.full
        keys, values = self.quantized.dequantize(dtype or self.full.keys.dtype)
        quantized = replace(self.quantized_meta, keys=keys, values=values)
        return quantized.cat(self.full)

    # -- storing, quantizing, evicting ----------------------------------------------------------------------

    def _new_tokens(self, keys: torch.Tensor, values: torch.Tensor) -> HeldTokens:
        batch, heads, n, _ = keys.shape
        start = self.cumulative_length
        self.cumulative_length += n
        index = torch.arange(start, start + n, dtype=torch.int32, device=keys.device).expand(batch, heads, n)
        scores = torch.zeros(batch, heads, n, device=keys.device)
        return HeldTokens(keys, values, index, scores)

    def _over_budget(self, n_new: int) -> bool:
        return self.budget is not None and self.held_tokens + n_new > self.budget

    def _commit(self, new: HeldTokens, everything: HeldTokens | None = None) -> None:
        """Store ``new`` tokens; ``everything`` (held + new, dequantized) is given when it was already built."""
        if not self._over_budget(new.n):
            self._append(new)
        elif new.n == 1:
            self._append(new, flush=False)
            self._evict_one()
            self._flush()
        else:
            self._rebuild(self.held(new.keys.dtype).cat(new) if everything is None else everything)

    def _append(self, new: HeldTokens, *, flush: bool = True) -> None:
        if self.full is None:
            raise RuntimeError("the layer holds nothing yet")
        self._set_full(self.full.cat(new))
        if flush:
            self._flush()

    def _set_full(self, full: HeldTokens) -> None:
        self.full = full
        # transformers code that looks at a layer's keys/values sees the full-precision part.
        self.keys, self.values = full.keys, full.values

    def _flush(self) -> None:
        """Quantize the oldest full-precision groups (sinks excepted) until fewer than 64 tokens remain."""
        if self.bits == 16 or self.full is None or self.full.n < KV_RESIDUAL + KV_GROUP:
            return
        full, sinks = self.full, self.n_sinks
        n_move = ((full.n - KV_RESIDUAL) // KV_GROUP) * KV_GROUP
        moving = full.slice(sinks, sinks + n_move)
        self._set_full(full.slice(0, sinks).cat(full.slice(sinks + n_move, full.n)))
        quantized = QuantizedKV.quantize(moving.keys, moving.values, self.bits)
        # The quantized tokens' index and scores ride in a HeldTokens whose states are empty (head_dim 0).
        meta = replace(moving, keys=moving.keys[..., :0], values=moving.values[..., :0])
        if self.quantized is None or self.quantized_meta is None:
            self.quantized, self.quantized_meta = quantized, meta
        else:
            self.quantized = self.quantized.cat(quantized)
            self.quantized_meta = self.quantized_meta.cat(meta)

    def _evict_one(self) -> None:
        """Decode rule, run after a new token joined the full-precision part and before it is flushed."""
        if self.full is None:
            raise RuntimeError("the layer holds nothing yet")
        full = self.full
        batch, heads = full.index.shape[:2]
        if self.policy is EvictionPolicy.SNAPKV:
            # The lowest score outside the most recent window; generated tokens score 0, ties go oldest first.
            candidates = full.n - min(self.snapkv_window, full.n - 1)
            self._set_full(full.drop(full.scores[:, :, :candidates].argmin(-1)))
        elif self.quantized is not None and self.quantized_meta is not None and self.quantized.n_groups > 0:
            # The oldest non-sink tokens are the oldest quantized group; one token would split its scales.
            kept = torch.arange(1, self.quantized.n_groups, device=full.index.device).expand(batch, heads, -1)
            self.quantized = self.quantized.keep_groups(kept)
            self.quantized_meta = self.quantized_meta.slice(KV_GROUP, self.quantized_meta.n)
        else:
            oldest = torch.full((batch, heads), self.n_sinks, dtype=torch.int64, device=full.index.device)
            self._set_full(full.drop(oldest))

    def _rebuild(self, everything: HeldTokens) -> None:
        """Keep ``budget`` of ``everything`` (held + new) by the policy and lay them out afresh."""
        kept = self._select(everything)
        if self.full is None:
            raise RuntimeError("the layer holds nothing yet")
        self.quantized = self.quantized_meta = None
        self._set_full(self.full.slice(0, 0))
        self._append(kept)

    def _select(self, everything: HeldTokens) -> HeldTokens:
        if self.budget is None:
            return everything
        order = everything.index.argsort(dim=-1).to(torch.int64)
        n, budget = everything.n, self.budget
        if self.policy is EvictionPolicy.SNAPKV:
            window = min(self.snapkv_window, budget)
            by_position = everything.take(order)
            prefix_scores = by_position.scores[:, :, : n - window]
            best = prefix_scores.topk(budget - window, dim=-1).indices.sort(dim=-1).values
            recent = torch.arange(n - window, n, device=order.device).expand(*order.shape[:2], window)
            return by_position.take(torch.cat([best, recent], dim=-1))
        positions = torch.cat([order[:, :, : self.n_sinks], order[:, :, n - (budget - self.n_sinks) :]], dim=-1)
        return everything.take(positions)

    def _map_tensors(self, fn: TensorMap) -> None:
        if self.full is not None:
            self._set_full(self.full.map(fn))
        if self.quantized is not None:
            self.quantized = self.quantized.map(fn)
        if self.quantized_meta is not None:
            self.quantized_meta = self.quantized_meta.map(fn)
        if self._pending is not None:
            self._pending = (self._pending[0].map(fn), self._pending[1])

    # -- the wired prefill ----------------------------------------------------------------------------------

    @property
    def pending(self) -> HeldTokens | None:
        """Held (dequantized) plus new tokens of a prefill waiting for :meth:`commit_prefill`."""
        return None if self._pending is None else self._pending[0]

    def commit_prefill(self, query: torch.Tensor, allowed: torch.Tensor | None, *, scaling: float) -> None:
        """Store the pending prefill tokens, scoring them with ``query`` ``[B, Hq, n_new, D]`` for SnapKV.

        ``allowed`` is the boolean mask ``[B, 1 or H, n_new, n]`` the attention used (None: causal).
        """
        if self._pending is None:
            raise RuntimeError("no prefill is pending on this layer")
        everything, n_held = self._pending
        self._pending = None
        if self.policy is EvictionPolicy.SNAPKV:
            scores = snapkv_scores(
                query, everything, allowed, scaling=scaling, window=self.snapkv_window, kernel=self.snapkv_kernel
            )
            everything = replace(everything, scores=scores)
        self._commit(everything.slice(n_held, everything.n), everything)

    def drop_pending(self) -> None:
        """Forget a prefill that was never committed (its forward failed); its tokens are not held."""
        if self._pending is not None:
            everything, n_held = self._pending
            self.cumulative_length -= everything.n - n_held
            self._pending = None


def snapkv_scores(
    query: torch.Tensor, tokens: HeldTokens, allowed: torch.Tensor | None, *, scaling: float, window: int, kernel: int
) -> torch.Tensor:
    """SnapKV's token scores ``[B, H, n]`` from the attention of the last ``window`` queries."""
    batch, q_heads, n_queries, _ = query.shape
    kv_heads, n = tokens.keys.shape[1], tokens.n
    window = min(window, n_queries)
    keys = tokens.keys.float().repeat_interleave(q_heads // kv_heads, dim=1)
    logits = query[:, :, -window:].float() @ keys.transpose(-1, -2) * scaling
    if allowed is None:
        # Plain causal over the new tokens, which end the sequence: query i sees keys up to n - n_queries + i.
        query_end = torch.arange(n - window, n, device=query.device).view(1, 1, window, 1)
        allowed = torch.arange(n, device=query.device).view(1, 1, 1, n) <= query_end
    else:
        allowed = allowed[:, :, -window:]
        if allowed.shape[1] not in (1, q_heads):
            allowed = allowed.repeat_interleave(q_heads // allowed.shape[1], dim=1)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    per_kv_head = probs.sum(dim=2).view(batch, kv_heads, q_heads // kv_heads, n).sum(dim=2)
    pooled = functional.avg_pool1d(
        per_kv_head.view(batch * kv_heads, 1, n), kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )
    return pooled.view(batch, kv_heads, n)


class PlanKVCache(Cache):
    """A cache with one :class:`PlanKVLayer` per decoder layer, each under its own ``KVSetting``.

    Pass it as ``past_key_values`` (or ``cache``) to a forward or to ``generate``. Mixed budgets, SnapKV
    and the quantized decode kernel need the model wired with ``use_plan_kv_attention_(model)``; without
    it the layers still store, quantize and evict (sink_window), and attention runs on their
    dequantized states, correct when every layer holds the same tokens (or no mask is materialized).
    """

    def __init__(
        self,
        settings: Sequence[KVSetting],
        *,
        sink_tokens: int = SINK_TOKENS,
        snapkv_window: int = SNAPKV_WINDOW,
        snapkv_kernel: int = SNAPKV_KERNEL,
    ) -> None:
        if not settings:
            raise ValueError("a PlanKVCache needs one KVSetting per decoder layer; got none")
        for layer, setting in enumerate(settings):
            if not isinstance(setting, KVSetting):
                raise ValueError(f"settings[{layer}] must be a KVSetting; got {type(setting).__name__}")
        options = {"sink_tokens": sink_tokens, "snapkv_window": snapkv_window, "snapkv_kernel": snapkv_kernel}
        layers: list[CacheLayerMixin | LinearAttentionCacheLayerMixin | DummyLayer] = [
            PlanKVLayer(setting, **options) for setting in settings
        ]
        super().__init__(layers=layers)

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        n_layers: int,
        sink_tokens: int = SINK_TOKENS,
        snapkv_window: int = SNAPKV_WINDOW,
        snapkv_kernel: int = SNAPKV_KERNEL,
    ) -> PlanKVCache:
        """The cache for a plan's KV units ``kv.<layer>``; layers the plan omits keep a dense 16-bit cache."""
        settings = []
        for layer in range(n_layers):
            setting = plan.get(f"kv.{layer}", KVSetting())  # KVUnit.key
            if not isinstance(setting, KVSetting):
                raise ValueError(f"plan entry for kv.{layer} must be a KVSetting; got {type(setting).__name__}")
            settings.append(setting)
        return cls(settings, sink_tokens=sink_tokens, snapkv_window=snapkv_window, snapkv_kernel=snapkv_kernel)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"this PlanKVCache has {len(self.layers)} layers (one KVSetting each); the model updated layer "
                f"{layer_idx}: build the cache with one setting per decoder layer"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def plan_layers(self) -> list[PlanKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, PlanKVLayer)]

    @property
    def settings(self) -> tuple[KVSetting, ...]:
        return tuple(layer.setting for layer in self.plan_layers)

    def layer_held_bytes(self) -> list[int]:
        """Bytes of K/V each layer holds, in layer order."""
        return [layer.held_bytes() for layer in self.plan_layers]

    def held_bytes(self) -> int:
        """Bytes of K/V the whole cache holds: ``sum(layer_held_bytes())``."""
        return sum(self.layer_held_bytes())
