"""How uneven the built-in model's sensitivities are, and how far any bits-only plan can beat uniform.

    python bench/sensitivity_spread.py [--json] [--model builtin]

The search-quality targets (a plan at 0.25× the KL of uniform 3-bit) come from a model whose
sensitivities were concentrated: its most sensitive linear was 110× the median. How much a
mixed-precision plan can gain depends on that spread, so this measures it on the model at hand,
with the same token sets as bench/search_quality.py (calibration KL here; held-out where said):

- for each bit-width, every linear compressed on its own (the rest dense): the spread of those
  single-unit KLs (largest / median), the units that dominate, and whether they add up (the KL of
  the uniform plan over the sum of the single-unit KLs);
- at the budgets of uniform 3-bit and 4-bit weights, the optimum of the additive model (the
  multiple-choice knapsack on those single-unit KLs, solved exactly), its predicted and measured
  KL, and its held-out KL as a multiple of uniform's. Where errors nearly add up, no bits-only plan
  does much better than that optimum, whatever strategy searches for it.

These measurement plans are mostly over the budget: this is an analysis of the model, not a search,
and it runs outside the controller. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers probes for.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._support.search_runs import BenchConfig, Cell, Counts, SearchBench  # noqa: E402
from budgetpress.search import CostedSpace, solve_mckp  # noqa: E402
from budgetpress.space import Split  # noqa: E402

BITS = (2, 3, 4, 8)
TOP_UNITS = 5


def _kl(bench: SearchBench, costed: CostedSpace, choices: dict[str, int], split: Split = Split.CALIBRATION) -> float:
    """The KL of a plan of linear choices; the KV caches (one choice, dense, in this space) stay dense."""
    full = {**dict.fromkeys(costed.groups, 0), **choices}
    result = bench.evaluate.one(costed.space.plan_from_choices(full), split).result
    assert result is not None, "an evaluation of the built-in model failed"
    return result.kl


def _linear_groups(costed: CostedSpace) -> list[str]:
    return [g for g in costed.groups if costed.space.choices(g) == costed.space.linear_choices]


def _spread(bench: SearchBench, costed: CostedSpace, log: bool) -> tuple[dict[str, object], dict[int, list[float]]]:
    """Per bit-width: single-unit KLs, their spread and additivity; and each group's KL per choice."""
    groups, labels = _linear_groups(costed), [c.label() for c in costed.space.linear_choices]
    dense = {g: labels.index("16b") for g in groups}
    index = {bits: next(i for i, c in enumerate(costed.space.linear_choices) if c.bits == bits) for bits in BITS}
    single: dict[int, list[float]] = {}
    report: dict[str, object] = {}
    for bits, choice in index.items():
        single[bits] = [_kl(bench, costed, {**dense, g: choice}) for g in groups]
        uniform = _kl(bench, costed, dict.fromkeys(groups, choice))
        median = statistics.median(single[bits])
        ranked = sorted(zip(single[bits], groups, strict=True), reverse=True)[:TOP_UNITS]
        report[f"{bits}bit"] = {
            "uniform_kl": uniform,
            "sum_single_kl": sum(single[bits]),
            "uniform_over_sum": uniform / sum(single[bits]),
            "max_over_median": max(single[bits]) / median,
            "top": [{"unit": g, "over_median": kl / median} for kl, g in ranked],
        }
        if log:
            _log(
                f"{bits}-bit: uniform KL {uniform:.4g}, uniform/sum {uniform / sum(single[bits]):.3f}, "
                f"max/median {max(single[bits]) / median:.1f}"
            )
    return report, {i: single[bits] for bits, i in index.items()}


def _additive_optimum(
    bench: SearchBench, costed: CostedSpace, per_choice: dict[int, list[float]], budget_name: str
) -> dict[str, object]:
    """The knapsack optimum on single-unit KLs at a budget, predicted and measured, against uniform."""
    groups, n_choices = _linear_groups(costed), len(costed.space.linear_choices)
    costs = [[costed.cost(g, c) for c in range(n_choices)] for g in groups]
    values = [[per_choice[c][i] if c in per_choice else 0.0 for c in range(n_choices)] for i in range(len(groups))]
    budget = bench.budget_bytes(Cell(space="bits", budget=budget_name, strategy="uniform"))
    (picked, predicted), *_ = solve_mckp(costs, values, budget - costed.bytes_of({}))
    plan = dict(zip(groups, picked, strict=True))
    # Costs are bytes saved from dense, so the KV caches (not in the knapsack) count as dense.
    uniform = bench.run(Cell(space="bits", budget=budget_name, strategy="uniform"))
    measured, held_out = _kl(bench, costed, plan), _kl(bench, costed, plan, Split.EVALUATION)
    return {
        "budget": budget_name,
        "budget_bytes": budget,
        "predicted_kl": predicted,
        "measured_kl": measured,
        "predicted_over_uniform": predicted / uniform.calibration_kl,
        "measured_over_uniform": measured / uniform.calibration_kl,
        "heldout_kl": held_out,
        "heldout_over_uniform": held_out / uniform.kl,
    }


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--model", default="builtin")
    args = parser.parse_args()
    config = BenchConfig(
        model=args.model,
        seed=0,
        seq_len=512,
        calibration_sequences=8,
        evaluation_sequences=16,
        counts=Counts(random=0, tpe=0, evolution=0, hybrid=0),
        log=_log,
    )
    bench = SearchBench(config)
    costed = bench.costed("bits")
    spread, per_choice = _spread(bench, costed, log=True)
    optima = [_additive_optimum(bench, costed, per_choice, name) for name in ("uniform-3bit", "uniform-4bit")]
    for optimum in optima:
        print(
            f"{optimum['budget']}: additive optimum predicted {optimum['predicted_over_uniform']:.3f}× uniform, "
            f"measured {optimum['measured_over_uniform']:.3f}× (calibration), {optimum['heldout_over_uniform']:.3f}× "
            "held-out",
            file=sys.stderr if args.json else sys.stdout,
        )
    if args.json:
        print(json.dumps({"spread": spread, "additive_optimum": optima}))


if __name__ == "__main__":
    main()
