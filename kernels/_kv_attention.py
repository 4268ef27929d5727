"""Decode attention over a layer's quantized cache, and the attention function that wires a PlanKVCache in.

``use_plan_kv_attention_(model)`` registers an attention function and a mask function with transformers'
``AttentionInterface`` / ``AttentionMaskInterface`` under ``PLAN_KV_ATTENTION``, switches the model to it, and
hooks every attention module so that, during its forward, the function knows the module's
:class:`PlanKVLayer` (the cache reaches the module as a keyword argument; the attention function does not
get it). For any other cache, or none, the function is plain ``sdpa`` (or ``eager``).

Masks: the mask function builds the ordinary causal-and-padding mask over every position seen (``kv_length
+ kv_offset`` columns from position 0: a layer reports ``(held + q, seen - held)``), and each layer gathers
the columns of the tokens it actually holds through their absolute indices, so layers with different
budgets, evicted tokens and left padding are all masked exactly. For other caches the last
``key.shape[-2]`` columns are the usual mask.

Prefill (several new tokens) attends with ``sdpa``/``eager`` over the held tokens (dequantized) plus the new
ones at full precision, then the layer stores the new tokens (SnapKV scores them with the queries first).
Decode (one new token) stores it first, then attends over what the layer holds: through
:func:`quantized_decode_attention` (Triton on a GPU, the reference elsewhere) when part of it is quantized,
through ``sdpa``/``eager`` otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

from budgetpress.kernels._backend import Backend, backend_for
from budgetpress.kernels._kv_cache import PlanKVCache, PlanKVLayer
from budgetpress.kernels._kv_quant import QuantizedKV
from budgetpress.space import EvictionPolicy

logger = logging.getLogger(__name__)

PLAN_KV_ATTENTION = "budgetpress_plan_kv"
BASE_ATTENTIONS = ("sdpa", "eager")
_CACHE_ATTR = "_budgetpress_kv_cache"
_BASE_ATTR = "_budgetpress_base_attention"
_HOOKED_ATTR = "_budgetpress_kv_hooked"


def quantized_decode_attention_reference(
    query: torch.Tensor,
    quantized: QuantizedKV | None,
    full_keys: torch.Tensor,
    full_values: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over one layer's cache, in plain torch (float32 inside).

    ``query`` ``[B, Hq, D]``; the cache: ``quantized`` (``q`` tokens per (batch row, KV head)) followed by
    ``full_keys``/``full_values`` ``[B, H, F, D]``; ``Hq`` a multiple of ``H`` (query head ``h`` reads KV head
    ``h // (Hq/H)``); ``key_mask`` bool ``[B, H, q + F]``, True where a token may be attended. Returns
    ``[B, Hq, D]`` in the query's dtype.
    """
    batch, q_heads, head_dim = query.shape
    kv_heads = full_keys.shape[1]
    keys, values = full_keys.float(), full_values.float()
    if quantized is not None and quantized.n_tokens:
        quantized_keys, quantized_values = quantized.dequantize(torch.float32)
        keys = torch.cat([quantized_keys, keys], dim=2)
        values = torch.cat([quantized_values, values], dim=2)
    grouped = query.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    scores = grouped @ keys.transpose(-1, -2) * scaling
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.unsqueeze(2), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values
    return out.view(batch, q_heads, head_dim).to(query.dtype)


def quantized_decode_attention_triton(
    query: torch.Tensor,
    quantized: QuantizedKV | None,
    full_keys: torch.Tensor,
    full_values: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel for :func:`quantized_decode_attention_reference`'s op (same arguments and result)."""
    # Imported here: the kernels module imports Triton, which `import budgetpress.kernels` must not need.
    from budgetpress.kernels import _triton_attention

    return _triton_attention.quantized_decode_attention_triton(
        query, quantized, full_keys, full_values, scaling=scaling, key_mask=key_mask
    )


def quantized_decode_attention(
    query: torch.Tensor,
    quantized: QuantizedKV | None,
    full_keys: torch.Tensor,
    full_values: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`quantized_decode_attention_reference`'s op on the backend for the query's device."""
    if backend_for(query.device) is Backend.TRITON:
        return quantized_decode_attention_triton(
            query, quantized, full_keys, full_values, scaling=scaling, key_mask=key_mask
        )
    return quantized_decode_attention_reference(
        query, quantized, full_keys, full_values, scaling=scaling, key_mask=key_mask
    )


def plan_kv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The sdpa mask over every position seen (``kv_length + kv_offset`` columns from 0); None if causal."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length + kv_offset,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=causal_mask_function if mask_function is None else mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def plan_kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: a wired PlanKVLayer's attention, plain attention otherwise."""
    scaling = float(cast(float, module.scaling)) if scaling is None else scaling
    layer = _wired_layer(module)
    if layer is None:
        mask = attention_mask
        if mask is not None and mask.shape[-1] != key.shape[2]:
            mask = mask[..., -key.shape[2] :]
        return _base_attention(module, query, key, value, mask, dropout, scaling, kwargs)
    if layer.pending is not None:
        return _prefill(module, layer, query, attention_mask, dropout, scaling, kwargs)
    return _decode(module, layer, query, attention_mask, dropout, scaling, kwargs)


def _prefill(
    module: nn.Module,
    layer: PlanKVLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens = layer.pending
    if tokens is None:
        raise RuntimeError("no prefill is pending on this layer")
    allowed = _held_mask(layer, attention_mask, tokens.index, query.shape[2])
    out = _base_attention(
        module, query, tokens.keys, tokens.values, _per_head(allowed, query), dropout, scaling, kwargs
    )
    layer.commit_prefill(query, allowed, scaling=scaling)
    return out


def _decode(
    module: nn.Module,
    layer: PlanKVLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if layer.full is None:
        raise RuntimeError("decode attention over a layer that holds nothing")
    allowed = None
    if attention_mask is not None or query.shape[2] > 1:
        # The held tokens' indices are gathered only when a mask must be built (not on unpadded decode).
        allowed = _held_mask(layer, attention_mask, layer.token_index(), query.shape[2])
    if layer.quantized is None or layer.n_quantized == 0 or query.shape[2] != 1:
        full = layer.full
        return _base_attention(
            module, query, full.keys, full.values, _per_head(allowed, query), dropout, scaling, kwargs
        )
    key_mask = None
    if allowed is not None:
        key_mask = allowed[:, :, 0].expand(-1, layer.full.keys.shape[1], -1)
    out = quantized_decode_attention(
        query[:, :, 0], layer.quantized, layer.full.keys, layer.full.values, scaling=scaling, key_mask=key_mask
    )
    return out.unsqueeze(1), None


def _held_mask(
    layer: PlanKVLayer, attention_mask: torch.Tensor | None, key_index: torch.Tensor, n_queries: int
) -> torch.Tensor | None:
    """Boolean ``[B, 1 or H, n_queries, n_keys]`` mask of the held keys; None where plain causal suffices."""
    seen = layer.cumulative_length
    n_keys = key_index.shape[2]
    if layer.policy is not EvictionPolicy.SNAPKV:
        # Every head holds the same tokens: one mask row serves all heads.
        key_index = key_index[:, :1]
    if attention_mask is None:
        if n_queries == 1 or n_keys == n_queries:
            return None
        query_index = torch.arange(seen - n_queries, seen, device=key_index.device)
        return key_index.unsqueeze(2) <= query_index.view(1, 1, n_queries, 1)
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if mask.shape[-1] != seen:
        raise ValueError(
            f"a PlanKVCache layer needs a mask over all {seen} positions seen; got one over {mask.shape[-1]} "
            "(a custom 4D attention mask must span every position, from 0)"
        )
    batch, heads = key_index.shape[:2]
    columns = key_index.long().unsqueeze(2).expand(batch, heads, mask.shape[2], n_keys)
    return torch.gather(mask.expand(batch, heads, -1, -1), 3, columns)


def _per_head(allowed: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """The held-key mask with one row per query head (or one shared row), as sdpa and eager take it."""
    if allowed is None or allowed.shape[1] in (1, query.shape[1]):
        return allowed
    return allowed.repeat_interleave(query.shape[1] // allowed.shape[1], dim=1)


def _base_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if getattr(module, _BASE_ATTR, "sdpa") == "eager":
        return _eager_attention(module, query, key, value, mask, dropout, scaling)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, weights = sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return output, weights


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, with None meaning causal (lower-right aligned) as sdpa reads it."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    weights = query @ key.transpose(2, 3) * scaling
    n_queries, n_keys = query.shape[2], key.shape[2]
    if mask is None and n_queries > 1:
        offset = n_keys - n_queries
        mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device).tril(diagonal=offset)
    if mask is not None:
        if mask.dtype == torch.bool:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _wired_layer(module: nn.Module) -> PlanKVLayer | None:
    cache = getattr(module, _CACHE_ATTR, None)
    if not isinstance(cache, PlanKVCache):
        return None
    layer = cache.layers[cast(int, module.layer_idx)]
    return layer if isinstance(layer, PlanKVLayer) and layer.deferred else None


def _before_attention(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: remember the module's PlanKVCache (it comes as ``cache`` or ``past_key_values``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    # A model switched back to another attention keeps its hooks; its layers must then update plainly.
    wired = getattr(getattr(module, "config", None), "_attn_implementation", None) == PLAN_KV_ATTENTION
    if wired and isinstance(cache, PlanKVCache):
        layer = cache.layers[cast(int, module.layer_idx)]
        if isinstance(layer, PlanKVLayer):
            layer.deferred = True
            setattr(module, _CACHE_ATTR, cache)
            return
    setattr(module, _CACHE_ATTR, None)


def _after_attention(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (also on errors): hand the layer back to plain updates, forget the cache."""
    cache = getattr(module, _CACHE_ATTR, None)
    if isinstance(cache, PlanKVCache):
        layer = cache.layers[cast(int, module.layer_idx)]
        if isinstance(layer, PlanKVLayer):
            layer.deferred = False
            layer.drop_pending()
    setattr(module, _CACHE_ATTR, None)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
    ]


def register_plan_kv_attention() -> None:
    """Register :func:`plan_kv_attention` and :func:`plan_kv_mask` with transformers under PLAN_KV_ATTENTION."""
    # Imported here: transformers' modeling utilities take seconds to import, and only wiring needs them.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PLAN_KV_ATTENTION, plan_kv_attention)
    AttentionMaskInterface.register(PLAN_KV_ATTENTION, plan_kv_mask)


def use_plan_kv_attention_(model: nn.Module, *, base: str | None = None) -> None:
    """Wire ``model`` (a transformers causal LM) so that a :class:`PlanKVCache` passed to it works fully.

    ``base`` (``"sdpa"`` or ``"eager"``) is the attention used for everything that is not the quantized
    decode path; by default the model's current one if it is one of those, else sdpa. Idempotent.
    """
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    base = base or (current if current in BASE_ATTENTIONS else "sdpa")
    if base not in BASE_ATTENTIONS:
        raise ValueError(f"base attention must be one of {', '.join(BASE_ATTENTIONS)}; got {base!r}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a layer_idx (transformers' *Attention); "
            "cannot wire a PlanKVCache"
        )
    register_plan_kv_attention()
    set_implementation = getattr(model, "set_attn_implementation", None)
    if set_implementation is None:
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    set_implementation(PLAN_KV_ATTENTION)
    for module in modules:
        setattr(module, _BASE_ATTR, base)
        if not getattr(module, _HOOKED_ATTR, False):
            module.register_forward_pre_hook(_before_attention, with_kwargs=True)
            module.register_forward_hook(_after_attention, always_call=True)
            setattr(module, _HOOKED_ATTR, True)
    logger.debug("wired %d attention modules of %s for PlanKVCache (base %s)", len(modules), type(model).__name__, base)
