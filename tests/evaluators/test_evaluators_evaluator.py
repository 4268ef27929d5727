from __future__ import annotations

from pathlib import Path

import pytest
import torch

from budgetpress.evaluators import TokenSpec, open_session, resolve_model
from budgetpress.evaluators._evaluator import kl_and_ppl
from budgetpress.space import LinearSetting, Plan, Split, Workload, plan_bytes


@pytest.fixture(scope="module")
def session(micro_model_dir: Path):  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    tokens = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
    return open_session(resolve_model(str(micro_model_dir)), tokens=tokens, workload=Workload(context=512))


def _uniform(session, bits: int) -> Plan:  # type: ignore[no-untyped-def]
    return Plan.uniform(session.profile.linear_units, linear=LinearSetting(bits=bits, group_size=128))


def test_dense_plan_has_zero_kl(session) -> None:  # type: ignore[no-untyped-def]
    result = session.evaluator.evaluate(Plan({}), split=Split.CALIBRATION)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.memory_bytes == plan_bytes(session.profile, Plan({}), Workload(context=512))
    assert result.tokens == 4 * 127


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


def test_fidelity_limits_tokens(session) -> None:  # type: ignore[no-untyped-def]
    result = session.evaluator.evaluate(_uniform(session, 3), split=Split.CALIBRATION, max_tokens=128)
    assert result.tokens == 127


def test_unsupported_setting_raises_clear_error(session) -> None:  # type: ignore[no-untyped-def]
    unit = session.profile.linear_units[0].key
    plan = Plan({unit: LinearSetting(bits=4, rank=8)})
    with pytest.raises(ValueError, match="bit-width variants only"):
        session.evaluator.evaluate(plan, split=Split.CALIBRATION)


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    dense = torch.log_softmax(logits, -1)
    other = torch.log_softmax(logits + torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1)), -1)
    targets = torch.zeros(2, 5, dtype=torch.long)
    assert kl_and_ppl(dense, dense, targets)[0] == pytest.approx(0.0, abs=1e-7)
    assert kl_and_ppl(dense, other, targets)[0] > 0
