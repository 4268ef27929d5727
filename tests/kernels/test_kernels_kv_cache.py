"""Quantized KV cache: packing, exact bytes, eviction, transformers integration, decode attention kernels."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from budgetpress.kernels._backend import interpreting
from budgetpress.kernels._kv_attention import (
    quantized_decode_attention,
    quantized_decode_attention_reference,
    use_plan_kv_attention_,
)
from budgetpress.kernels._kv_cache import PlanKVCache, PlanKVLayer, snapkv_scores
from budgetpress.kernels._kv_quant import (
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    pack_kv_codes,
    quantize_keys,
    quantize_values,
    unpack_kv_codes,
)
from budgetpress.space import KV_GROUP, KVSetting, KVUnit, Plan, Workload, kv_bytes

BATCH, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 2, 4, 64


@pytest.fixture(autouse=True)
def _quiet_deprecations() -> Iterator[None]:
    # transformers 5.24 renames past_key_values to cache; the brief's spelling still works and warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _expected_quantized(tokens: int, bits: int) -> int:
    if bits == 16 or tokens <= 32:
        return 0
    return ((tokens - 32) // 32) * 32


# -- packing and quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 5])
def test_pack_unpack_round_trip_and_layout(bits: int, head_dim: int) -> None:
    codes = torch.randint(0, 2**bits, (2, 3, 96, head_dim), generator=torch.Generator().manual_seed(bits))
    codes = codes.to(torch.uint8)
    packed = pack_kv_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 3, 4 * bits, head_dim)
    assert packed.numel() == 2 * 3 * 96 * head_dim * bits // 8  # no padding, whatever the head_dim
    assert torch.equal(unpack_kv_codes(packed, bits), codes)
    # Token 1 of the first group sits in byte row 0 at bit `bits` (2 and 4 bits) or in row 1 (8 bits).
    one = torch.zeros(1, 32, 1, dtype=torch.uint8)
    one[0, 1, 0] = 1
    expected_row, expected_byte = (1, 1) if bits == 8 else (0, 1 << bits)
    assert int(pack_kv_codes(one, bits)[0, 0, expected_row, 0]) == expected_byte


def test_packing_rejects_bad_bits_and_partial_groups() -> None:
    with pytest.raises(ValueError, match="2, 4 or 8"):
        pack_kv_codes(torch.zeros(32, 4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="groups of 32"):
        quantize_keys(torch.zeros(1, 31, 4), 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_within_half_a_step(bits: int) -> None:
    x = _randn(2, 2, 64, 64, seed=bits) * 3 + 1
    k_codes, k_scale, k_zero = quantize_keys(x, bits)
    v_codes, v_scale, v_zero = quantize_values(x, bits)
    assert k_scale.shape == (2, 2, 2, 64) and v_scale.shape == (2, 2, 64)
    assert k_scale.dtype == k_zero.dtype == v_scale.dtype == torch.float16
    keys = dequantize_keys(k_codes, k_scale, k_zero, bits)
    values = dequantize_values(v_codes, v_scale, v_zero, bits)
    # Half a step plus the fp16 rounding of scale and zero.
    key_step = k_scale.float().repeat_interleave(KV_GROUP, dim=2)
    slack = 2e-3 * x.abs().amax()
    assert ((keys - x).abs() <= key_step / 2 + slack).all()
    assert ((values - x).abs() <= v_scale.float().unsqueeze(-1) / 2 + slack).all()
    levels = 2**bits - 1
    assert (keys - x).abs().max() < 0.6 * (x.amax() - x.amin()) / levels


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantization_is_exact_and_requantization_reproduces_the_bytes(bits: int) -> None:
    quantized = QuantizedKV.quantize(_randn(1, 2, 96, 16, seed=1), _randn(1, 2, 96, 16, seed=2), bits)
    keys, values = quantized.dequantize()
    codes = unpack_kv_codes(quantized.key_codes, bits).float().view(1, 2, 3, 32, 16)
    by_hand = codes * quantized.key_scale.float().unsqueeze(3) + quantized.key_zero.float().unsqueeze(3)
    assert torch.equal(keys, by_hand.view(1, 2, 96, 16))
    again = QuantizedKV.quantize(keys, values, bits)
    assert all(torch.equal(a, b) for a, b in zip(quantized.tensors(), again.tensors(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again.dequantize(), (keys, values), strict=True))


# -- a layer's bytes and eviction ----------------------------------------------------------------------------


def _prefill(layer: PlanKVLayer, keys: torch.Tensor, values: torch.Tensor, seed: int = 0) -> None:
    """What the wired attention does on a prefill: update, then commit with the queries."""
    layer.deferred = True
    layer.update(keys, values)
    if layer.pending is not None:
        query = _randn(keys.shape[0], Q_HEADS, keys.shape[2], keys.shape[3], seed=seed, dtype=keys.dtype)
        layer.commit_prefill(query, None, scaling=keys.shape[3] ** -0.5)
    layer.deferred = False


def _assert_layout(layer: PlanKVLayer, setting: KVSetting, held: int) -> None:
    unit = KVUnit(layer=0, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    assert layer.held_tokens == held
    assert layer.n_quantized == _expected_quantized(held, setting.bits)
    assert layer.held_bytes() == kv_bytes(unit, setting, Workload(batch=BATCH, context=held))


SETTINGS = [
    KVSetting(),
    *(KVSetting(bits=bits) for bits in (2, 4, 8)),
    *(KVSetting(bits=bits, kept_tokens=kept, policy=policy) for bits in (2, 4, 8, 16) for kept in (40, 70)
      for policy in ("sink_window", "snapkv")),
]  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label().replace(" ", "_"))
@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 63, 64, 65, 100, 129])
def test_held_bytes_equal_the_memory_model_after_prefill(setting: KVSetting, tokens: int) -> None:
    layer = PlanKVLayer(setting)
    keys = _randn(BATCH, KV_HEADS, tokens, HEAD_DIM, seed=tokens, dtype=torch.bfloat16)
    _prefill(layer, keys, keys.flip(-1))
    unit = KVUnit(layer=0, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    assert layer.held_bytes() == kv_bytes(unit, setting, Workload(batch=BATCH, context=tokens))
    held = min(tokens, setting.kept_tokens or tokens)
    _assert_layout(layer, setting, held)
    assert layer.get_seq_length() == tokens
    assert layer.get_mask_sizes(1) == (held + 1, tokens - held)


@pytest.mark.parametrize("setting", SETTINGS[3:], ids=lambda s: s.label().replace(" ", "_"))
def test_decode_never_exceeds_the_budget_and_keeps_the_layout(setting: KVSetting) -> None:
    layer = PlanKVLayer(setting)
    keys = _randn(BATCH, KV_HEADS, 100, HEAD_DIM, seed=3, dtype=torch.bfloat16)
    _prefill(layer, keys[:, :, :60], keys[:, :, :60])
    budget = setting.kept_tokens or 10**9
    for step in range(60, 100):
        layer.update(keys[:, :, step : step + 1], keys[:, :, step : step + 1])
        assert layer.held_tokens <= budget
        _assert_layout(layer, setting, layer.held_tokens)
        # The newest token is always held, at full precision.
        assert int(layer.token_index()[0, 0, -1]) == step
    assert layer.get_seq_length() == 100


def _positions(layer: PlanKVLayer, row: int = 0, head: int = 0) -> list[int]:
    return sorted(int(i) for i in layer.token_index()[row, head])


def test_sink_window_keeps_the_sinks_and_the_most_recent_window() -> None:
    keys = _randn(1, KV_HEADS, 110, HEAD_DIM, seed=4)
    small = PlanKVLayer(KVSetting(bits=2, kept_tokens=40, policy="sink_window"))
    _prefill(small, keys[:, :, :100], keys[:, :, :100])
    assert _positions(small) == [0, 1, 2, 3, *range(64, 100)]
    small.update(keys[:, :, 100:101], keys[:, :, 100:101])  # no quantized group: one token goes
    assert _positions(small) == [0, 1, 2, 3, *range(65, 101)]

    large = PlanKVLayer(KVSetting(bits=4, kept_tokens=70, policy="sink_window"))
    _prefill(large, keys[:, :, :100], keys[:, :, :100])
    assert _positions(large) == [0, 1, 2, 3, *range(34, 100)]
    # Sinks stay full precision: the quantized group holds the oldest non-sink tokens.
    assert sorted(int(i) for i in large.token_index()[0, 0, : large.n_quantized]) == list(range(34, 66))
    large.update(keys[:, :, 100:101], keys[:, :, 100:101])  # over budget: the oldest group of 32 goes
    assert _positions(large) == [0, 1, 2, 3, *range(66, 101)]
    assert large.held_tokens == 70 - 31


def _planted(n_tokens: int, picks: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys where the picked tokens (per KV head) match every query; queries that all look one way."""
    direction = _randn(HEAD_DIM, seed=seed)
    direction = direction / direction.norm()
    keys = _randn(1, KV_HEADS, n_tokens, HEAD_DIM, seed=seed + 1) * 0.1
    for head, positions in enumerate(picks):
        keys[0, head, positions] += 8 * direction
    query = (direction * 8).expand(1, Q_HEADS, n_tokens, HEAD_DIM).clone()
    return keys, query


def test_snapkv_keeps_the_window_and_the_top_scored_tokens_per_head() -> None:
    picks = [[3, 17, 40], [8, 23, 51]]
    keys, query = _planted(100, picks, seed=5)
    layer = PlanKVLayer(KVSetting(bits=16, kept_tokens=35, policy="snapkv"), snapkv_kernel=1)
    layer.deferred = True
    layer.update(keys, keys)
    layer.commit_prefill(query, None, scaling=HEAD_DIM**-0.5)
    for head, positions in enumerate(picks):
        assert _positions(layer, head=head) == [*positions, *range(68, 100)]


def test_snapkv_pooled_scores_pick_the_top_tokens() -> None:
    keys = _randn(2, KV_HEADS, 90, HEAD_DIM, seed=6)
    query = _randn(2, Q_HEADS, 90, HEAD_DIM, seed=7)
    layer = PlanKVLayer(KVSetting(bits=16, kept_tokens=50, policy="snapkv"))
    layer.deferred = True
    layer.update(keys, keys)
    layer.commit_prefill(query, None, scaling=0.125)
    # The scores by hand: softmax of the last 32 queries (causal), summed over them and over each KV
    # head's query heads, averaged over 7 neighbours; the best 18 of the first 58 join the window.
    logits = query[:, :, -32:] @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.125
    causal = torch.arange(90).view(1, 90) <= torch.arange(58, 90).view(32, 1)
    attention = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(2)
    per_kv = attention.view(2, KV_HEADS, 2, 90).sum(2)
    pooled = torch.stack([per_kv[..., max(0, i - 3) : i + 4].mean(-1) for i in range(90)], dim=-1)
    for row in range(2):
        for head in range(KV_HEADS):
            best = pooled[row, head, :58].topk(18).indices.tolist()
            assert _positions(layer, row, head) == sorted(best) + list(range(58, 90))


def test_snapkv_decode_evicts_generated_groups_before_its_picks() -> None:
    picks = [[3, 17, 40], [8, 23, 51]]
    keys, query = _planted(100, picks, seed=8)
    layer = PlanKVLayer(KVSetting(bits=4, kept_tokens=70, policy="snapkv"))
    layer.deferred = True
    layer.update(keys, keys)
    layer.commit_prefill(query, None, scaling=HEAD_DIM**-0.5)
    layer.deferred = False
    new = _randn(1, KV_HEADS, 80, HEAD_DIM, seed=9)
    for step in range(80):
        layer.update(new[:, :, step : step + 1], new[:, :, step : step + 1])
        assert layer.held_tokens <= 70
    for head, positions in enumerate(picks):
        assert set(positions) <= set(_positions(layer, head=head))
    assert max(_positions(layer)) == 179


def test_snapkv_scores_sum_to_the_window_attention() -> None:
    keys = _randn(1, KV_HEADS, 40, HEAD_DIM, seed=10)
    query = _randn(1, Q_HEADS, 40, HEAD_DIM, seed=11)
    layer = PlanKVLayer(KVSetting(bits=16, kept_tokens=40, policy="snapkv"))
    layer.deferred = True
    layer.update(keys, keys)
    tokens = layer.pending
    assert tokens is not None
    scores = snapkv_scores(query, tokens, None, scaling=0.125, window=8, kernel=1)
    # Each of 8 queries spreads a probability mass of 1 per query head; 2 query heads per KV head.
    assert torch.allclose(scores.sum(-1), torch.full((1, KV_HEADS), 16.0))


def test_snapkv_without_wiring_is_refused() -> None:
    cache = PlanKVCache([KVSetting(bits=16, kept_tokens=8, policy="snapkv")])
    keys = _randn(1, KV_HEADS, 20, HEAD_DIM, seed=12)
    with pytest.raises(ValueError, match="use_plan_kv_attention_"):
        cache.update(keys, keys, 0)


def test_cache_from_plan_and_total_bytes() -> None:
    plan = Plan({"kv.0": KVSetting(bits=4), "kv.2": KVSetting(bits=2, kept_tokens=40, policy="sink_window")})
    cache = PlanKVCache.from_plan(plan, n_layers=3)
    assert cache.settings == (KVSetting(bits=4), KVSetting(), plan["kv.2"])
    keys = _randn(BATCH, KV_HEADS, 100, HEAD_DIM, seed=13, dtype=torch.bfloat16)
    for layer in range(3):
        cache.update(keys, keys, layer)
    unit = KVUnit(layer=0, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    expected = [kv_bytes(unit, setting, Workload(batch=BATCH, context=100)) for setting in cache.settings]
    assert cache.layer_held_bytes() == expected
    assert cache.held_bytes() == sum(expected)
    assert cache.get_seq_length() == 100


# -- a tiny Llama ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
    )


def _model(config: LlamaConfig, attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attention)
    return model


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prefill_and_decode(model: LlamaForCausalLM, cache: object, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.no_grad():
        logits = [model(ids[:, :prompt], past_key_values=cache).logits[:, -1]]
        for step in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, step : step + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("wired", [False, True])
def test_sixteen_bit_cache_gives_the_dynamic_cache_logits_exactly(config: LlamaConfig, wired: bool) -> None:
    model = _model(config)
    ids = _ids(2, 104, seed=1)
    dense = _prefill_and_decode(model, DynamicCache(config=config), ids, prompt=100)
    if wired:
        use_plan_kv_attention_(model)
    plan_cache = PlanKVCache([KVSetting()] * 2)
    assert torch.equal(_prefill_and_decode(model, plan_cache, ids, prompt=100), dense)
    assert plan_cache.get_seq_length() == 104


def test_quantized_logits_approach_dense_as_bits_grow(config: LlamaConfig) -> None:
    model = _model(config)
    ids = _ids(2, 104, seed=2)
    dense = _prefill_and_decode(model, DynamicCache(config=config), ids, prompt=100)
    use_plan_kv_attention_(model)
    errors = {}
    for bits in (8, 4, 2):
        logits = _prefill_and_decode(model, PlanKVCache([KVSetting(bits=bits)] * 2), ids, prompt=100)
        assert torch.equal(logits[:, 0], dense[:, 0])  # prefill attends at full precision
        errors[bits] = float((logits - dense).abs().max())
    assert 0 < errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.02 * float(dense.abs().max())


def test_sink_window_decode_matches_a_masked_dense_forward(config: LlamaConfig) -> None:
    """At 16 bits, eviction is exactly attention with the evicted positions masked out."""
    model = _model(config)
    ids = _ids(2, 46, seed=3)
    use_plan_kv_attention_(model)
    cache = PlanKVCache([KVSetting(kept_tokens=20, policy="sink_window")] * 2)
    with torch.no_grad():
        first = model(ids[:, :30], past_key_values=cache).logits
        chunk = model(ids[:, 30:45], past_key_values=cache).logits  # a second prefill chunk over a full budget
        step = model(ids[:, 45:46], past_key_values=cache).logits
        model.set_attn_implementation("sdpa")
        dense = DynamicCache(config=config)
        assert torch.allclose(model(ids[:, :30], past_key_values=dense).logits, first, atol=1e-5)
        # The chunk sees what the first prefill left (sinks, positions 14..29) and itself.
        held = torch.zeros(2, 45, dtype=torch.long)
        held[:, :4], held[:, 14:] = 1, 1
        masked = model(ids[:, 30:45], past_key_values=dense, attention_mask=held).logits
        assert torch.allclose(masked, chunk, atol=1e-5)
        # The chunk left sinks and 29..44; the decode token evicted the oldest non-sink, 29.
        held = torch.zeros(2, 46, dtype=torch.long)
        held[:, :4], held[:, 30:] = 1, 1
        masked = model(ids[:, 45:46], past_key_values=dense, attention_mask=held).logits
        assert torch.allclose(masked, step, atol=1e-5)
    assert _positions(cache.plan_layers[0]) == [0, 1, 2, 3, *range(30, 46)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_generate_with_padding_matches_dense_at_sixteen_bits(config: LlamaConfig, attention: str) -> None:
    model = _model(config, attention)
    ids = _ids(2, 40, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding
    options = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dense = model.generate(ids, attention_mask=mask, **options)
        use_plan_kv_attention_(model)
        planned = model.generate(ids, attention_mask=mask, past_key_values=PlanKVCache([KVSetting()] * 2), **options)
    assert torch.equal(planned.sequences, dense.sequences)
    assert all(torch.equal(a, b) for a, b in zip(planned.logits, dense.logits, strict=True))


def test_generate_and_forward_with_a_mixed_cache(config: LlamaConfig) -> None:
    model = _model(config).to(torch.bfloat16)
    use_plan_kv_attention_(model)
    settings = [
        KVSetting(bits=2, kept_tokens=70, policy="snapkv"),
        KVSetting(bits=4, kept_tokens=40, policy="sink_window"),
    ]
    cache = PlanKVCache(settings)
    ids = _ids(2, 90, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 102)
    assert cache.get_seq_length() == 101
    unit = KVUnit(layer=0, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    for layer, setting in zip(cache.plan_layers, settings, strict=True):
        assert 0 < layer.held_tokens <= (setting.kept_tokens or 0)
        assert layer.held_bytes() == kv_bytes(unit, setting, Workload(batch=2, context=layer.held_tokens))
    # A plain forward: prefill, then one token; positions continue after eviction.
    cache = PlanKVCache(settings)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        step = model(ids[:, -1:], past_key_values=cache)
    assert step.logits.shape == (2, 1, 96) and torch.isfinite(step.logits).all()
    assert cache.get_seq_length() == 91


def test_unwired_sink_window_cache_runs_a_plain_model(config: LlamaConfig) -> None:
    model = _model(config)
    cache = PlanKVCache([KVSetting(bits=4, kept_tokens=70, policy="sink_window")] * 2)
    with torch.no_grad():
        out = model.generate(_ids(1, 80, seed=6), past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 85)
    assert all(layer.held_tokens <= 70 for layer in cache.plan_layers)


def test_triton_backend_runs_the_wired_decode(config: LlamaConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    model = _model(config)
    use_plan_kv_attention_(model)
    ids = _ids(1, 70, seed=7)
    reference = _prefill_and_decode(model, PlanKVCache([KVSetting(bits=4)] * 2), ids, prompt=68)
    monkeypatch.setenv("BUDGETPRESS_KERNELS", "triton")
    triton_logits = _prefill_and_decode(model, PlanKVCache([KVSetting(bits=4)] * 2), ids, prompt=68)
    assert torch.allclose(triton_logits, reference, atol=1e-4)


# -- decode attention kernels ---------------------------------------------------------------------------------


def _decode_case(
    bits: int, batch: int, kv_heads: int, n_rep: int, head_dim: int, groups: int, full: int, seed: int
) -> tuple[torch.Tensor, QuantizedKV, torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = _randn(batch, kv_heads, groups * 32, head_dim, seed=seed) * 2
    quantized = QuantizedKV.quantize(keys, _randn(batch, kv_heads, groups * 32, head_dim, seed=seed + 1), bits)
    full_keys = _randn(batch, kv_heads, full, head_dim, seed=seed + 2, dtype=torch.bfloat16)
    full_values = _randn(batch, kv_heads, full, head_dim, seed=seed + 3, dtype=torch.bfloat16)
    query = _randn(batch, kv_heads * n_rep, head_dim, seed=seed + 4, dtype=torch.bfloat16)
    key_mask = torch.rand(batch, kv_heads, groups * 32 + full, generator=torch.Generator().manual_seed(seed)) > 0.3
    return query, quantized, full_keys, full_values, key_mask


DECODE_SHAPES = [(2, 2, 3, 64, 2, 37), (1, 1, 4, 48, 3, 5), (1, 2, 1, 64, 1, 0)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("batch", "kv_heads", "n_rep", "head_dim", "groups", "full"), DECODE_SHAPES)
def test_triton_decode_attention_equals_the_reference(
    bits: int, batch: int, kv_heads: int, n_rep: int, head_dim: int, groups: int, full: int
) -> None:
    pytest.importorskip("triton")
    from budgetpress.kernels._triton_attention import quantized_decode_attention_triton

    query, quantized, full_keys, full_values, key_mask = _decode_case(
        bits, batch, kv_heads, n_rep, head_dim, groups, full, seed=bits + groups
    )
    for mask in (None, key_mask):
        expected = quantized_decode_attention_reference(
            query, quantized, full_keys, full_values, scaling=head_dim**-0.5, key_mask=mask
        )
        got = quantized_decode_attention_triton(
            query, quantized, full_keys, full_values, scaling=head_dim**-0.5, key_mask=mask
        )
        assert got.dtype == query.dtype and got.shape == query.shape
        assert torch.allclose(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
        assert (got.float() - expected.float()).abs().mean() < 2e-3


def test_triton_decode_attention_without_a_quantized_part() -> None:
    pytest.importorskip("triton")
    from budgetpress.kernels._triton_attention import quantized_decode_attention_triton

    query, _, full_keys, full_values, _ = _decode_case(4, 1, 2, 2, 64, 1, 45, seed=20)
    expected = quantized_decode_attention_reference(query, None, full_keys, full_values, scaling=0.125)
    got = quantized_decode_attention_triton(query, None, full_keys, full_values, scaling=0.125)
    assert torch.allclose(got.float(), expected.float(), atol=2e-2)


@pytest.mark.parametrize("bits", [2, 8])
def test_reference_decode_attention_equals_sdpa_on_dequantized_states(bits: int) -> None:
    query, quantized, full_keys, full_values, key_mask = _decode_case(bits, 2, 2, 3, 64, 2, 11, seed=30)
    query, full_keys, full_values = query.float(), full_keys.float(), full_values.float()
    keys, values = quantized.dequantize()
    keys = torch.cat([keys, full_keys], dim=2).repeat_interleave(3, dim=1)
    values = torch.cat([values, full_values], dim=2).repeat_interleave(3, dim=1)
    mask = key_mask.repeat_interleave(3, dim=1).unsqueeze(2)
    expected = functional.scaled_dot_product_attention(query.unsqueeze(2), keys, values, attn_mask=mask, scale=0.125)
    got = quantized_decode_attention_reference(
        query, quantized, full_keys, full_values, scaling=0.125, key_mask=key_mask
    )
    assert torch.allclose(got, expected.squeeze(2), atol=1e-5)
    # On the CPU the dispatching op is the reference.
    dispatched = quantized_decode_attention(query, quantized, full_keys, full_values, scaling=0.125, key_mask=key_mask)
    assert torch.equal(dispatched, got)


def test_cropping_is_refused_clearly() -> None:
    from budgetpress.kernels import PlanKVCache
    from budgetpress.space import KVSetting

    cache = PlanKVCache([KVSetting(bits=4)])
    assert not cache.layers[0].is_croppable
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.layers[0].crop(1)
