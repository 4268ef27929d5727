"""Calibration-based compression methods: GPTQ, magnitude/Wanda/SparseGPT, SVD/SVD-LLM, statistics.

The methods are judged by the property they exist for: a lower layer output error
||X W^T - X W'^T|| on calibration activations than their calibration-free baselines, on
correlated activations with outlier channels and on the activations of a real (tiny) model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from budgetpress.evaluators import (
    InputStats,
    InputStatsAccumulator,
    LowRankWeight,
    PrunedWeight,
    QuantizedWeight,
    collect_input_stats,
    gptq_quantize,
    load_model,
    prune_magnitude,
    prune_sparsegpt,
    prune_wanda,
    resolve_model,
    rtn_quantize,
    svd_llm_low_rank,
    svd_low_rank,
)
from budgetpress.evaluators._sparsity import kept_per_row

OUT, IN = 96, 128
MODEL_LINEARS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
)


def correlated_activations(n: int, width: int, seed: int) -> torch.Tensor:
    """Activations from a 48-dimensional latent mixed into ``width`` channels, plus noise, with
    four outlier channels 15x larger, as in LLM hidden states."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 48, generator=generator)
    mixing = torch.randn(48, width, generator=generator) / 48**0.5
    x: torch.Tensor = latent @ mixing + 0.1 * torch.randn(n, width, generator=generator)
    x[:, [3, 17, width // 2, width - 5]] *= 15.0
    return x


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, InputStats]:
    x = correlated_activations(1024, IN, seed=0)
    weight = 0.1 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    accumulator = InputStatsAccumulator(IN)
    for part in torch.split(x.view(8, 128, IN), 3):  # batch by batch, as the calibration pass feeds it
        accumulator.add(part)
    return x, weight, accumulator.result()


def output_error(stats: InputStats, weight: torch.Tensor, compressed: torch.Tensor) -> float:
    """||X (W - W')^T||_F from X^T X: sqrt(trace(D X^T X D^T)), D = W - W'."""
    assert stats.xtx is not None
    diff = (weight - compressed).double()
    return float(torch.einsum("oi,ij,oj->", diff, stats.xtx.double(), diff).sqrt())


@pytest.fixture(scope="module")
def micro_stats(micro_model_dir: Path) -> dict[str, tuple[torch.Tensor, InputStats]]:
    model = load_model(resolve_model(str(micro_model_dir)))
    text = (Path(json.__file__).parent / "decoder.py").read_bytes()[: 8 * 128]
    tokens = torch.tensor(list(text), dtype=torch.long).view(8, 128)
    stats = collect_input_stats(model, tokens, names=MODEL_LINEARS, batch_size=3)
    return {name: (linear_weight(model, name), stats[name]) for name in MODEL_LINEARS}


def linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    linear = model.get_submodule(name)
    assert isinstance(linear, nn.Linear)
    return linear.weight.detach().clone()


# --- statistics -------------------------------------------------------------------------------


def test_accumulated_statistics_equal_the_direct_sums(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    x, _, stats = layer
    assert stats.xtx is not None and stats.n_tokens == len(x)
    assert torch.allclose(stats.xtx, x.T @ x, rtol=1e-4, atol=1e-2)
    assert torch.allclose(stats.column_norms(), x.norm(dim=0), rtol=1e-4)
    assert torch.allclose(stats.hessian(), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    norms_only = InputStats.from_activations(x, hessian=False)
    assert norms_only.xtx is None
    assert torch.allclose(norms_only.sq_norms, stats.sq_norms)
    with pytest.raises(ValueError, match="hessian=True"):
        norms_only.hessian()


def test_collected_statistics_match_the_linears_inputs(micro_model_dir: Path) -> None:
    model = load_model(resolve_model(str(micro_model_dir)))
    tokens = torch.randint(0, 256, (5, 32), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(q, nn.Linear) and isinstance(down, nn.Linear)
    handles = [
        q.register_forward_pre_hook(lambda _m, args: seen["q"].append(args[0].detach().clone())),
        down.register_forward_pre_hook(lambda _m, args: seen["down"].append(args[0].detach().clone())),
    ]
    stats = collect_input_stats(model, tokens, batch_size=2)
    for handle in handles:
        handle.remove()
    for key, name in (("q", "model.layers.0.self_attn.q_proj"), ("down", "model.layers.1.mlp.down_proj")):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]])
        assert stats[name].n_tokens == 5 * 32
        assert torch.allclose(stats[name].xtx, x.T @ x, rtol=1e-4, atol=1e-3)  # type: ignore[arg-type]
    # Siblings reading one tensor share one statistics object; others have their own.
    assert stats["model.layers.0.self_attn.k_proj"] is stats["model.layers.0.self_attn.q_proj"]
    assert stats["model.layers.0.mlp.up_proj"] is stats["model.layers.0.mlp.gate_proj"]
    assert stats["model.layers.0.self_attn.o_proj"] is not stats["model.layers.0.self_attn.q_proj"]
    assert "lm_head" in stats
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        collect_input_stats(model, tokens, names=["model.layers.0.mlp"])


class _Siblings(nn.Module):
    """Two linears that read one tensor in the first forward pass and different ones later."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids.float()
        self.calls += 1
        out: torch.Tensor = self.a(x) + self.b(x if self.calls == 1 else x + 1.0)
        return out


def test_linears_that_stop_sharing_their_input_are_refused() -> None:
    tokens = torch.arange(16).view(4, 4)
    stats = collect_input_stats(_Siblings(), tokens[:1])  # type: ignore[arg-type]
    assert stats["a"] is stats["b"] and stats["a"].n_tokens == 1
    with pytest.raises(RuntimeError, match="shared its input"):
        collect_input_stats(_Siblings(), tokens, batch_size=1)  # type: ignore[arg-type]


def test_statistics_without_tokens_are_refused() -> None:
    empty = InputStatsAccumulator(8).result()
    assert empty.n_tokens == 0 and empty.xtx is not None and not empty.xtx.any()
    weight = torch.ones(4, 8)
    with pytest.raises(ValueError, match="no calibration tokens"):
        gptq_quantize(weight, empty, bits=4, group_size=None)
    with pytest.raises(ValueError, match="no calibration tokens"):
        prune_sparsegpt(weight, empty, sparsity=0.5, pattern="2:4")


# --- GPTQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_activations(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats], bits: int, group_size: int | None, act_order: bool
) -> None:
    _, weight, stats = layer
    rtn = output_error(stats, weight, rtn_quantize(weight, bits=bits, group_size=group_size).dequantize())
    quantized = gptq_quantize(weight, stats, bits=bits, group_size=group_size, act_order=act_order)
    assert output_error(stats, weight, quantized.dequantize()) < 0.95 * rtn
    check_on_grid(quantized, bits, (OUT, IN))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_a_real_models_activations(
    micro_stats: dict[str, tuple[torch.Tensor, InputStats]], bits: int
) -> None:
    for name, (weight, stats) in micro_stats.items():
        for group_size, act_order in ((32, True), (128, False), (None, True)):
            rtn = output_error(stats, weight, rtn_quantize(weight, bits=bits, group_size=group_size).dequantize())
            gptq = gptq_quantize(weight, stats, bits=bits, group_size=group_size, act_order=act_order)
            assert output_error(stats, weight, gptq.dequantize()) < 0.8 * rtn, (name, group_size, act_order)


def check_on_grid(quantized: QuantizedWeight, bits: int, shape: tuple[int, int]) -> None:
    """Codes in range, one fp16 scale and integer zero per (row, group), values on that grid."""
    out_features, in_features = shape
    n_groups = -(-in_features // quantized.group_size)
    assert quantized.codes.shape == shape and quantized.codes.dtype == torch.uint8
    assert quantized.scales.shape == quantized.zeros.shape == (out_features, n_groups)
    assert quantized.scales.dtype == torch.float16 and quantized.zeros.dtype == torch.uint8
    assert int(quantized.codes.max()) <= 2**bits - 1 and int(quantized.zeros.max()) <= 2**bits - 1
    assert bool(torch.all(quantized.scales > 0))
    scales = quantized.scales.float().repeat_interleave(quantized.group_size, dim=1)[:, :in_features]
    zeros = quantized.zeros.float().repeat_interleave(quantized.group_size, dim=1)[:, :in_features]
    assert torch.equal(quantized.dequantize(), (quantized.codes.float() - zeros) * scales)


def test_gptq_static_groups_use_rtns_grids_on_original_columns(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats],
) -> None:
    _, weight, stats = layer
    for group_size in (32, None):
        gptq = gptq_quantize(weight, stats, bits=3, group_size=group_size, act_order=True)
        rtn = rtn_quantize(weight, bits=3, group_size=group_size)
        assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)
        assert gptq.group_size == rtn.group_size


def test_gptq_with_an_identity_hessian_is_rtn() -> None:
    # Uncorrelated inputs of equal power: no error can be compensated, rounding is optimal.
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    stats = InputStats(xtx=torch.eye(64) * 10.0, sq_norms=torch.full((64,), 10.0), n_tokens=10)
    for act_order in (True, False):
        gptq = gptq_quantize(weight, stats, bits=4, group_size=32, act_order=act_order)
        assert torch.equal(gptq.codes, rtn_quantize(weight, bits=4, group_size=32).codes)


def test_gptq_lazy_blocks_do_not_change_the_result(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    _, weight, stats = layer
    for act_order in (True, False):
        blocked = gptq_quantize(weight, stats, bits=3, group_size=32, act_order=act_order)
        small = gptq_quantize(weight, stats, bits=3, group_size=32, act_order=act_order, block_size=7)
        assert (blocked.codes != small.codes).float().mean() < 0.01


def test_gptq_dead_inputs_quantize_to_zero_and_stay_finite() -> None:
    x = correlated_activations(512, 64, seed=4)
    x[:, [5, 40]] = 0.0
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    quantized = gptq_quantize(weight, InputStats.from_activations(x), bits=4, group_size=32)
    dequantized = quantized.dequantize()
    assert torch.isfinite(dequantized).all()
    assert torch.equal(dequantized[:, [5, 40]], torch.zeros(24, 2))


def test_gptq_rejects_bad_settings(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    _, weight, stats = layer
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(weight, stats, bits=16, group_size=32)
    with pytest.raises(ValueError, match="inputs"):
        gptq_quantize(weight[:, :64], stats, bits=4, group_size=32)


def test_rtn_is_safe_on_zero_and_partial_groups() -> None:
    weight = torch.randn(8, 96, generator=torch.Generator().manual_seed(6))
    weight[:, :32] = 0.0
    zeroed = rtn_quantize(weight, bits=3, group_size=32)
    check_on_grid(zeroed, 3, (8, 96))
    assert torch.equal(zeroed.dequantize()[:, :32], torch.zeros(8, 32))
    # A partial last group's grid comes from its own columns (and 0), not from other groups.
    partial = torch.randn(8, 40, generator=torch.Generator().manual_seed(7))
    partial[:, :32] *= 100.0
    tail = rtn_quantize(partial, bits=3, group_size=32)
    assert torch.equal(tail.scales[:, 1], rtn_quantize(partial[:, 32:], bits=3, group_size=None).scales[:, 0])


# --- sparsity -----------------------------------------------------------------------------------


def check_pruned(pruned: PrunedWeight, *, pattern: str, sparsity: float, bits: int) -> None:
    """The memory model's layouts exactly: k per row or 2 of every 4; zeros where pruned."""
    out_features, in_features = pruned.mask.shape
    if pattern == "2:4":
        assert torch.all(pruned.mask.view(out_features, -1, 4).sum(-1) == 2)
    else:
        assert torch.all(pruned.mask.sum(1) == kept_per_row(in_features, sparsity, pattern))
    assert pruned.weight.dtype == torch.float32
    assert torch.all(pruned.weight[~pruned.mask] == 0)
    if bits == 16:
        assert pruned.quantized is None
        return
    assert pruned.quantized is not None
    check_on_grid(pruned.quantized, bits, (out_features, in_features))
    assert torch.equal(pruned.weight, pruned.quantized.dequantize() * pruned.mask)
    zeros = pruned.quantized.zeros.repeat_interleave(pruned.quantized.group_size, dim=1)[:, :in_features]
    assert torch.equal(pruned.quantized.codes[~pruned.mask], zeros[~pruned.mask])


@pytest.mark.parametrize(
    ("pattern", "bits", "group_size"),
    [
        ("unstructured", 16, None),
        ("2:4", 16, None),
        ("unstructured", 4, 128),
        ("2:4", 4, 32),
        ("unstructured", 3, None),
    ],
)
def test_wanda_and_sparsegpt_beat_magnitude(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats], pattern: str, bits: int, group_size: int | None
) -> None:
    _, weight, stats = layer
    settings = {"sparsity": 0.5, "pattern": pattern, "bits": bits, "group_size": group_size}
    magnitude = prune_magnitude(weight, **settings)  # type: ignore[arg-type]
    wanda = prune_wanda(weight, stats, **settings)  # type: ignore[arg-type]
    sparsegpt = prune_sparsegpt(weight, stats, **settings)  # type: ignore[arg-type]
    errors = [output_error(stats, weight, p.weight) for p in (magnitude, wanda, sparsegpt)]
    assert errors[1] < 0.8 * errors[0] and errors[2] < errors[1]
    for pruned in (magnitude, wanda, sparsegpt):
        check_pruned(pruned, pattern=pattern, sparsity=0.5, bits=bits)


@pytest.mark.parametrize(("pattern", "bits"), [("unstructured", 16), ("2:4", 16), ("unstructured", 4), ("2:4", 4)])
def test_pruning_beats_magnitude_on_a_real_models_activations(
    micro_stats: dict[str, tuple[torch.Tensor, InputStats]], pattern: str, bits: int
) -> None:
    for name, (weight, stats) in micro_stats.items():
        settings = {"sparsity": 0.5, "pattern": pattern, "bits": bits, "group_size": 32}
        magnitude = output_error(stats, weight, prune_magnitude(weight, **settings).weight)  # type: ignore[arg-type]
        wanda = output_error(stats, weight, prune_wanda(weight, stats, **settings).weight)  # type: ignore[arg-type]
        sparsegpt = output_error(stats, weight, prune_sparsegpt(weight, stats, **settings).weight)  # type: ignore[arg-type]
        assert wanda < magnitude and sparsegpt < 0.8 * magnitude, name


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_masks_keep_exactly_k_per_row_at_any_width(sparsity: float) -> None:
    # 300 columns: not a multiple of the 128-column blocks nor of the groups.
    x = correlated_activations(400, 300, seed=7)
    stats = InputStats.from_activations(x)
    weight = torch.randn(20, 300, generator=torch.Generator().manual_seed(8))
    for bits in (16, 4):
        for pruned in (
            prune_magnitude(weight, sparsity=sparsity, pattern="unstructured", bits=bits, group_size=64),
            prune_magnitude(weight, sparsity=sparsity, pattern="unstructured", bits=bits, group_size=64, stats=stats),
            prune_wanda(weight, stats, sparsity=sparsity, pattern="unstructured", bits=bits, group_size=64),
            prune_sparsegpt(weight, stats, sparsity=sparsity, pattern="unstructured", bits=bits, group_size=64),
        ):
            check_pruned(pruned, pattern="unstructured", sparsity=sparsity, bits=bits)
            assert torch.isfinite(pruned.weight).all()


def test_unpruned_kept_weights_are_unchanged_without_quantization(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats],
) -> None:
    _, weight, stats = layer
    for pruned in (
        prune_magnitude(weight, sparsity=0.5, pattern="unstructured"),
        prune_wanda(weight, stats, sparsity=0.5, pattern="2:4"),
    ):
        assert torch.equal(pruned.weight, weight * pruned.mask)
    sparsegpt = prune_sparsegpt(weight, stats, sparsity=0.5, pattern="unstructured")
    assert not torch.equal(sparsegpt.weight, weight * sparsegpt.mask)  # OBS updated the kept weights


def test_magnitude_quantization_uses_the_hessian_when_given(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats],
) -> None:
    _, weight, stats = layer
    rounded = prune_magnitude(weight, sparsity=0.5, pattern="unstructured", bits=3, group_size=32)
    compensated = prune_magnitude(weight, sparsity=0.5, pattern="unstructured", bits=3, group_size=32, stats=stats)
    assert torch.equal(rounded.mask, compensated.mask)
    target = weight * rounded.mask
    assert output_error(stats, target, compensated.weight) < 0.9 * output_error(stats, target, rounded.weight)


def test_sparsegpt_prunes_dead_inputs_first() -> None:
    x = correlated_activations(512, 64, seed=9)
    x[:, [2, 33]] = 0.0
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(10))
    pruned = prune_sparsegpt(weight, InputStats.from_activations(x), sparsity=0.25, pattern="unstructured", bits=4)
    assert not pruned.mask[:, [2, 33]].any()
    check_pruned(pruned, pattern="unstructured", sparsity=0.25, bits=4)


def test_pruning_rejects_bad_patterns(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    _, weight, stats = layer
    with pytest.raises(ValueError, match="2:4"):
        prune_sparsegpt(weight, stats, sparsity=0.6, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        prune_magnitude(weight, sparsity=0.5, pattern="none")
    with pytest.raises(ValueError, match="2:4"):
        prune_wanda(weight[:, :126], InputStats.from_activations(torch.ones(4, 126)), sparsity=0.5, pattern="2:4")


# --- low rank -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "group_size"), [(16, None), (8, 32), (4, 32)])
def test_svd_llm_beats_plain_svd(
    layer: tuple[torch.Tensor, torch.Tensor, InputStats], bits: int, group_size: int | None
) -> None:
    _, weight, stats = layer
    for rank in (8, 32, 64):
        plain = svd_low_rank(weight, rank=rank, bits=bits, group_size=group_size)
        aware = svd_llm_low_rank(weight, stats, rank=rank, bits=bits, group_size=group_size)
        assert output_error(stats, weight, aware.effective()) < 0.8 * output_error(stats, weight, plain.effective())
        for factored in (plain, aware):
            check_low_rank(factored, rank=rank, bits=bits, shape=(OUT, IN))


def check_low_rank(factored: LowRankWeight, *, rank: int, bits: int, shape: tuple[int, int]) -> None:
    assert factored.rank == rank
    assert factored.down.shape == (rank, shape[1]) and factored.up.shape == (shape[0], rank)
    if bits == 16:
        assert factored.down_q is None and factored.up_q is None
        assert torch.allclose(factored.effective(), factored.up @ factored.down)
        return
    assert factored.down_q is not None and factored.up_q is not None
    check_on_grid(factored.down_q, bits, (rank, shape[1]))
    check_on_grid(factored.up_q, bits, (shape[0], rank))
    assert torch.equal(factored.effective(), factored.up_q.dequantize() @ factored.down_q.dequantize())


def test_svd_llm_beats_plain_svd_on_a_real_models_activations(
    micro_stats: dict[str, tuple[torch.Tensor, InputStats]],
) -> None:
    for name, (weight, stats) in micro_stats.items():
        for rank in (16, 64):
            plain = output_error(stats, weight, svd_low_rank(weight, rank=rank).effective())
            aware = output_error(stats, weight, svd_llm_low_rank(weight, stats, rank=rank).effective())
            assert aware < 0.8 * plain, (name, rank)


def test_full_rank_factors_reproduce_the_weight(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    _, weight, stats = layer
    assert torch.allclose(svd_low_rank(weight, rank=OUT).effective(), weight, atol=1e-5)
    assert torch.allclose(svd_llm_low_rank(weight, stats, rank=OUT).effective(), weight, atol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        svd_low_rank(weight, rank=OUT + 1)


# --- determinism --------------------------------------------------------------------------------


def test_every_method_is_deterministic(layer: tuple[torch.Tensor, torch.Tensor, InputStats]) -> None:
    _, weight, stats = layer

    def outputs() -> list[torch.Tensor]:
        gptq = gptq_quantize(weight, stats, bits=3, group_size=32)
        sparse = [
            prune_magnitude(weight, sparsity=0.5, pattern="unstructured", bits=4, stats=stats),
            prune_wanda(weight, stats, sparsity=0.5, pattern="2:4", bits=4),
            prune_sparsegpt(weight, stats, sparsity=0.5, pattern="unstructured", bits=4),
        ]
        low_rank = svd_llm_low_rank(weight, stats, rank=16, bits=4, group_size=32)
        return [gptq.codes, *(p.weight for p in sparse), low_rank.effective()]

    for first, second in zip(outputs(), outputs(), strict=True):
        assert torch.equal(first, second)
