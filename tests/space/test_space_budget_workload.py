from __future__ import annotations

import pytest

from budgetpress.space import Budget, BudgetKind, Workload

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "kind", "value", "resolved"),
    [
        ("40%", BudgetKind.FRACTION, 0.4, 400_000),
        ("12.5 %", BudgetKind.FRACTION, 0.125, 125_000),
        ("100%", BudgetKind.FRACTION, 1.0, 1_000_000),
        ("29%", BudgetKind.FRACTION, 0.29, 290_000),
        ("  7%  ", BudgetKind.FRACTION, 0.07, 70_000),
        ("1.5e9", BudgetKind.BYTES, 1.5e9, 1_500_000_000),
        ("123456", BudgetKind.BYTES, 123456.0, 123_456),
        ("6GiB", BudgetKind.BYTES, 6.0 * GiB, 6 * GiB),
        ("6 GiB", BudgetKind.BYTES, 6.0 * GiB, 6 * GiB),
        ("6 gib", BudgetKind.BYTES, 6.0 * GiB, 6 * GiB),
        ("500MiB", BudgetKind.BYTES, 500.0 * 2**20, 500 * 2**20),
        ("12KiB", BudgetKind.BYTES, 12288.0, 12_288),
        ("2TiB", BudgetKind.BYTES, 2.0 * 2**40, 2 * 2**40),
        ("1.5GB", BudgetKind.BYTES, 1.5e9, 1_500_000_000),
        ("300MB", BudgetKind.BYTES, 3e8, 300_000_000),
        ("10kB", BudgetKind.BYTES, 1e4, 10_000),
        ("10KB", BudgetKind.BYTES, 1e4, 10_000),
        ("64B", BudgetKind.BYTES, 64.0, 64),
        ("1B", BudgetKind.BYTES, 1.0, 1),
        ("0.5KiB", BudgetKind.BYTES, 512.0, 512),
    ],
)
def test_parse_good_budgets(text: str, kind: BudgetKind, value: float, resolved: int) -> None:
    budget = Budget.parse(text)
    assert budget.kind is kind
    assert budget.value == value
    assert budget.resolve(1_000_000) == resolved
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "-5",
        "-40%",
        "abc",
        "40%%",
        "0%",
        "101%",
        "nan",
        "inf",
        "NaN%",
        "0",
        "1",
        "0.4",
        "6 XB",
        "6GiBs",
        "0.5B",
        "1e999",
        "1e99999999",
        "4 0%",
        "0x10",
        "１２３",
        "GiB",
    ],
)
def test_parse_bad_budgets(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot parse budget .*accepted: a percentage") as info:
        Budget.parse(text)
    assert repr(text) in str(info.value)


def test_plain_fraction_gets_percent_hint() -> None:
    with pytest.raises(ValueError, match=r"write a percentage like '40%'"):
        Budget.parse("0.4")


def test_budget_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match=r"fraction budget value must be in \(0, 1\]; got 1.5"):
        Budget(kind=BudgetKind.FRACTION, value=1.5)
    with pytest.raises(ValueError, match=r"byte budget value must be a whole number of bytes"):
        Budget(kind=BudgetKind.BYTES, value=10.5)
    with pytest.raises(ValueError, match=r"kind must be one of 'bytes', 'fraction'"):
        Budget(kind="percent", value=0.5)  # type: ignore[arg-type]


def test_budget_str() -> None:
    assert str(Budget.parse("6GiB")) == "6GiB"
    assert str(Budget.parse("1.5e9")) == "1500000000B"
    assert str(Budget.parse("12.5%")) == "12.5%"
    assert str(Budget(kind=BudgetKind.FRACTION, value=1 / 3)) == "33.33333333333333%"
    assert Budget.parse(str(Budget(kind=BudgetKind.FRACTION, value=1 / 3))).value == 1 / 3


@pytest.mark.parametrize(
    ("text", "batch", "context"),
    [
        ("batch=1,context=2048", 1, 2048),
        ("context=2048,batch=8", 8, 2048),
        (" batch = 2 , context = 16 ", 2, 16),
        ("context=4096", 1, 4096),
        ("batch=3", 3, 512),
        ("", 1, 512),
        ("batch=4096,context=1048576", 4096, 1_048_576),
    ],
)
def test_parse_good_workloads(text: str, batch: int, context: int) -> None:
    workload = Workload.parse(text)
    assert workload == Workload(batch=batch, context=context)
    assert Workload.parse(str(workload)) == workload
    assert str(workload) == f"batch={batch},context={context}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch=0", r"batch must be an integer in \[1, 4096\]; got 0"),
        ("batch=4097", r"batch must be an integer in \[1, 4096\]"),
        ("context=1048577", r"context must be an integer in \[1, 1048576\]"),
        ("batch=1.5", r"batch must be a whole number; got '1.5'; accepted form: 'batch=<int>,context=<int>'"),
        ("batch=-1", r"whole number; got '-1'"),
        ("context=", r"whole number; got ''"),
        ("tokens=5", r"unrecognised item 'tokens=5'; accepted form"),
        ("batch:1", r"unrecognised item 'batch:1'"),
        ("batch=1,", r"unrecognised item ''"),
        ("batch=1,batch=2", r"sets 'batch' twice"),
    ],
)
def test_parse_bad_workloads(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Workload.parse(text)


@pytest.mark.parametrize(("text", "dense", "expected"), [("29%", 100, 29), ("57%", 100, 57), ("40%", 7, 2)])
def test_fraction_resolve_is_exact_for_decimal_percentages(text: str, dense: int, expected: int) -> None:
    # Plain float maths gives 0.29 * 100 == 28.999999999999996, which would floor to 28.
    assert Budget.parse(text).resolve(dense) == expected
