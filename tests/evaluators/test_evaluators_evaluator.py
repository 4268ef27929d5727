from __future__ import annotations

from pathlib import Path

import pytest
import torch

from budgetpress.evaluators import (
    KVTokenSpec,
    SessionSpec,
    TokenSpec,
    build_store,
    kl_and_ppl,
    open_session,
    profile_source,
)
from budgetpress.evaluators import resolve_model as resolve
from budgetpress.space import (
    Dimension,
    KVSetting,
    LinearSetting,
    Plan,
    SearchSpace,
    Split,
    Workload,
    plan_bytes,
)

WORKLOAD = Workload(context=512)
TOKENS = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)


def _open(model_dir: Path, dimensions: frozenset[Dimension], kv: KVTokenSpec | None = None):  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    spec = SessionSpec(model=str(model_dir), workload=WORKLOAD, tokens=TOKENS, kv_tokens=kv, methods="bits=rtn")
    space = SearchSpace.for_dimensions(profile_source(resolve(str(model_dir))), dimensions, context=WORKLOAD.context)
    build_store(spec, space, progress=False)
    return open_session(spec)


@pytest.fixture(scope="module")
def session(micro_model_dir: Path):  # type: ignore[no-untyped-def]
    return _open(micro_model_dir, frozenset({Dimension.BITS}))


def _uniform(session, bits: int) -> Plan:  # type: ignore[no-untyped-def]
    return Plan.uniform(session.profile.linear_units, linear=LinearSetting(bits=bits, group_size=128))


def test_dense_plan_has_zero_kl(session) -> None:  # type: ignore[no-untyped-def]
    result = session.evaluator.evaluate(Plan({}), split=Split.CALIBRATION)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.memory_bytes == plan_bytes(session.profile, Plan({}), WORKLOAD)
    assert result.tokens == 4 * 127
    assert result.fidelity is None


def test_fewer_bits_lose_more(session) -> None:  # type: ignore[no-untyped-def]
    kls = [session.evaluator.evaluate(_uniform(session, b), split=Split.EVALUATION).kl for b in (2, 3, 4, 8)]
    assert kls == sorted(kls, reverse=True)
    assert kls[0] > 0


def test_assembly_is_reversible_and_repeatable(session) -> None:  # type: ignore[no-untyped-def]
    plan = _uniform(session, 3)
    first = session.evaluator.evaluate(plan, split=Split.CALIBRATION)
    session.evaluator.evaluate(_uniform(session, 2), split=Split.CALIBRATION)
    assert session.evaluator.evaluate(plan, split=Split.CALIBRATION).kl == first.kl
    assert session.evaluator.evaluate(Plan({}), split=Split.CALIBRATION).kl == pytest.approx(0.0, abs=1e-6)


def test_assembled_weights_are_the_stored_packed_variants(session) -> None:  # type: ignore[no-untyped-def]
    from budgetpress.evaluators import LevelStore

    plan = _uniform(session, 3)
    session.evaluator.evaluate(plan, split=Split.CALIBRATION)
    unit = session.profile.linear_units[0].key
    store: LevelStore = session.evaluator._store
    packed = store.module(unit, plan[unit])
    assert torch.equal(session.evaluator.model.get_submodule(unit).weight, packed.dequantized_weight())


def test_fidelity_limits_tokens_and_is_recorded(session) -> None:  # type: ignore[no-untyped-def]
    result = session.evaluator.evaluate(_uniform(session, 3), split=Split.CALIBRATION, max_tokens=128)
    assert result.tokens == 127
    assert result.fidelity == 128


def test_setting_missing_from_the_store_raises_clear_error(session) -> None:  # type: ignore[no-untyped-def]
    unit = session.profile.linear_units[0].key
    plan = Plan({unit: LinearSetting(bits=4, rank=8)})
    with pytest.raises(ValueError, match="has no entry for unit"):
        session.evaluator.evaluate(plan, split=Split.CALIBRATION)


def test_kv_settings_are_scored_with_the_compressed_cache(micro_model_dir: Path) -> None:
    kv = KVTokenSpec(prefill_len=96, continuation_len=32, calibration_sequences=2, evaluation_sequences=2)
    session = _open(micro_model_dir, frozenset({Dimension.BITS, Dimension.KV}), kv)
    dense = session.evaluator.evaluate(Plan({}), split=Split.CALIBRATION)
    assert dense.kl == pytest.approx(0.0, abs=1e-6)
    assert dense.tokens == 4 * 127 + 2 * 31
    kv_units = session.profile.kv_units
    two_bit = Plan({u.key: KVSetting(bits=2) for u in kv_units})
    evicting = Plan({u.key: KVSetting(bits=16, kept_tokens=16, policy="sink_window") for u in kv_units})
    results = [session.evaluator.evaluate(p, split=Split.CALIBRATION) for p in (two_bit, evicting)]
    for result in results:
        metrics = result.metrics()
        assert metrics["weight_kl"] == pytest.approx(0.0, abs=1e-6)  # the weights are dense
        assert metrics["kv_kl"] > 0
        assert result.kl == pytest.approx(metrics["kv_kl"] * 62 / result.tokens)
    both = Plan({**two_bit, **_uniform(session, 3)})
    combined = session.evaluator.evaluate(both, split=Split.CALIBRATION).metrics()
    assert combined["weight_kl"] > 0 and combined["kv_kl"] > 0


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    dense = torch.log_softmax(logits, -1)
    other = torch.log_softmax(logits + torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1)), -1)
    targets = torch.zeros(2, 5, dtype=torch.long)
    assert kl_and_ppl(dense, dense, targets)[0] == pytest.approx(0.0, abs=1e-7)
    assert kl_and_ppl(dense, other, targets)[0] > 0
