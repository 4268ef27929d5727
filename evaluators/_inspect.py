"""A transformers model → its profile: the compressible units and the bytes of everything else."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from budgetpress.space import KVUnit, LinearUnit, ModelProfile

BYTES_PER_16BIT = 2


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen/Mistral-style causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no model.layers; budgetpress supports decoder-only "
            "causal LMs laid out like Llama, Qwen and Mistral"
        )
    return layers


def _linear_units(model: PreTrainedModel) -> list[LinearUnit]:
    units: list[LinearUnit] = []
    for index, layer in enumerate(decoder_layers(model)):
        for relative, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                units.append(
                    LinearUnit(
                        name=f"model.layers.{index}.{relative}",
                        layer=index,
                        in_features=module.in_features,
                        out_features=module.out_features,
                        has_bias=module.bias is not None,
                    )
                )
    return units


def _kv_units(model: PreTrainedModel) -> list[KVUnit]:
    config = model.config
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_layers = len(decoder_layers(model))
    return [KVUnit(layer=i, n_kv_heads=n_kv_heads, head_dim=head_dim) for i in range(n_layers)]


def profile_model(model: PreTrainedModel, *, name: str) -> ModelProfile:
    """Inspect a loaded model into the plain-data profile that the search and memory model use."""
    linears = _linear_units(model)
    linear_params = sum(u.n_params for u in linears)
    # parameters() yields tied tensors once, which is how they are stored.
    total_params = sum(p.numel() for p in model.parameters())
    other_params = total_params - linear_params
    return ModelProfile(
        name=name,
        architecture=type(model).__name__,
        n_layers=len(decoder_layers(model)),
        linear_units=tuple(linears),
        kv_units=tuple(_kv_units(model)),
        other_params=other_params,
        other_bytes=other_params * BYTES_PER_16BIT,
        vocab_size=int(model.config.vocab_size),
    )
