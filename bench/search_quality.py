"""Search quality: every strategy side by side on the built-in model, judged on held-out tokens.

    python bench/search_quality.py [--json] [--space bits|bits,kv|...] [--quick] [--seed 0]

Budgets are the memory of the uniform 3-bit and uniform 4-bit weight plans (and, when ``--space``
includes kv, that of uniform 4-bit weights with a 4-bit KV cache). For each budget each strategy
runs through the real controller on calibration tokens; its best full-fidelity plan is then
measured on held-out evaluation tokens the search never saw, and every KL in the table is that
held-out KL. A joint search (bits + sparsity + rank) runs the hybrid beside the bits-only one at
the same budgets and number of evaluations.

Strategies: ``tpe`` is TPE warm-started by the integer program (its measurements and verified
plans are TPE's history, all counted, and its measured table projects each of TPE's asks onto
the budget); ``tpe-plain`` (one budget) is TPE from the uniform plan alone, with random
repair. ``evo`` starts from the best uniform plan; ``ilp`` and ``hybrid`` measure from the best
uniform plan (the operating point), and ``hybrid`` is evolution from the integer program's
verified plans.

Counting: ``evals`` is the number of trials a strategy asked (every fidelity counts as one, so an
evolution's cheap screening evaluations count like full ones); ``evals_to_5pct`` is the first
trial after which the best full-fidelity calibration fitness so far was within 5% of its final
value. An evaluation is deterministic, so results are cached by (plan, fidelity) across rows:
the hybrid re-uses the integer program's measurements without evaluating them again, but counts
them. ``ilp_solve_s_10k`` times the knapsack on a synthetic 10,000-unit × 32-setting table.

With ``--json`` the last line is one JSON object: {"rows": [...], "ilp_solve_s_10k": float}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers probes for.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._support.search_runs import (  # noqa: E402
    BenchConfig,
    Cell,
    Counts,
    SearchBench,
    ilp_solve_seconds,
)

FULL_COUNTS = Counts(random=50, tpe=300, evolution=1000, hybrid=1000)
QUICK_COUNTS = Counts(random=8, tpe=24, evolution=60, hybrid=None)


def _cells(space: str, counts: Counts) -> list[Cell]:
    """The (space, budget, strategy) rows: every strategy bits-only, the hybrid also jointly."""
    strategies = ("uniform", "random", "tpe", "evo", "ilp", "hybrid")
    budgets = ["uniform-3bit", "uniform-4bit"]
    cells = [Cell(space="bits", budget=b, strategy=s) for b in budgets for s in strategies]
    # Plain TPE (from the uniform plan, no integer program) once, to show what the warm start buys.
    cells.insert(strategies.index("tpe") + 1, Cell(space="bits", budget=budgets[0], strategy="tpe-plain"))
    cells += [Cell(space="bits,sparsity,rank", budget=b, strategy=s) for b in budgets for s in ("uniform", "hybrid")]
    if "kv" in space.split(","):
        cells += [Cell(space=space, budget="uniform-4bit+kv4", strategy=s) for s in strategies]
    return cells


def _selected(cell: Cell, args: argparse.Namespace) -> bool:
    space_ok = args.only_space is None or cell.space == args.only_space
    strategy_ok = args.only_strategy is None or cell.strategy in ("uniform", *args.only_strategy.split(","))
    return space_ok and strategy_ok and (args.only_budget is None or cell.budget == args.only_budget)


def _table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'space':<19} {'budget':<17} {'strategy':<8} {'evals':>6} {'to 5%':>6} "
        f"{'held-out KL':>12} {'× uniform':>9} {'ppl':>8} {'memory B':>10}"
    ]
    uniform = {(r["space"], r["budget"]): r["kl"] for r in rows if r["strategy"] == "uniform"}
    for r in rows:
        ratio = float(r["kl"]) / float(uniform[(r["space"], r["budget"])])  # type: ignore[arg-type]
        lines.append(
            f"{r['space']:<19} {r['budget']:<17} {r['strategy']:<8} {r['evals']:>6} {r['evals_to_5pct']:>6} "
            f"{r['kl']:>12.5g} {ratio:>9.3f} {r['ppl']:>8.4f} {r['memory_bytes']:>10}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--space", default="bits", help="bits (default), or with kv: bits,kv")
    parser.add_argument("--quick", action="store_true", help="few evaluations: a smoke run, not the figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-space", default=None, help="run only the rows of this space, e.g. bits")
    parser.add_argument("--only-budget", default=None, help="run only the rows of this budget, e.g. uniform-4bit")
    parser.add_argument(
        "--only-strategy", default=None, help="run only these strategies' rows (and uniform's), e.g. tpe,tpe-plain"
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--evaluation-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    config = BenchConfig(
        model=args.model,
        seed=args.seed,
        seq_len=args.seq_len,
        calibration_sequences=args.calibration_sequences,
        evaluation_sequences=args.evaluation_sequences,
        counts=QUICK_COUNTS if args.quick else FULL_COUNTS,
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    bench = SearchBench(config)
    started = time.perf_counter()
    cells = [c for c in _cells(args.space, config.counts) if _selected(c, args)]
    rows = []
    for cell in cells:
        rows.append(bench.run(cell).to_dict())
        # Each row as it completes, so that an interrupted run still leaves its figures.
        print(f"row {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    solve_s = ilp_solve_seconds()
    print(_table(rows), file=sys.stderr if args.json else sys.stdout)
    summary = f"{len(rows)} rows in {time.perf_counter() - started:.0f} s; ILP solve 10k×32: {solve_s:.3f} s"
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"rows": rows, "ilp_solve_s_10k": solve_s}))


if __name__ == "__main__":
    main()
