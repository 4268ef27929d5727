"""Evaluation throughput: assembling and scoring a plan vs. a plain dense forward over the same tokens.

    python bench/eval_throughput.py [--json] [--plans 12] [--space bits,sparsity,rank] [--store DIR]

On the built-in model it builds the level store for the space (in a fresh temporary folder unless
``--store`` names one: then its build time is that of whatever was missing), then alternates, in one
run, plain dense forward passes over the calibration tokens with evaluations of random plans of the
space (assembly from the store + forward + KL against the cached dense distributions), and reports
the ratio of their medians. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers probes for: drop this folder
# from the import path before anything imports transformers.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from budgetpress.evaluators import SessionSpec, TokenSpec, build_store, open_session  # noqa: E402
from budgetpress.space import Plan, SearchSpace, Split, Workload, parse_dimensions  # noqa: E402


def random_plans(space: SearchSpace, n: int, seed: int) -> list[Plan]:
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        choices = {name: int(rng.integers(len(space.choices(name)))) for name, _ in space.groups()}
        plans.append(space.plan_from_choices(choices))
    return plans


def dense_forward_s(model: torch.nn.Module, tokens: torch.Tensor, chunk: int = 4) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(tokens), chunk):
            model(input_ids=tokens[start : start + chunk])
    return time.perf_counter() - started


def measure(args: argparse.Namespace, store_root: Path) -> dict[str, object]:
    spec = SessionSpec(model="builtin", workload=Workload(), tokens=TokenSpec(), store_root=str(store_root))
    session_space = _space(spec, args.space)
    report = build_store(spec, session_space, progress=not args.json)
    session = open_session(spec)
    evaluator = session.evaluator
    tokens = evaluator.tokens(Split.CALIBRATION)
    model = evaluator.model
    dense_s: list[float] = []
    eval_s: list[float] = []
    for plan in random_plans(session_space, args.plans, args.seed):
        evaluator.assemble_(Plan({}))
        dense_s.append(dense_forward_s(model, tokens))
        started = time.perf_counter()
        evaluator.evaluate(plan, split=Split.CALIBRATION)
        eval_s.append(time.perf_counter() - started)
    return {
        "model": "builtin",
        "space": args.space,
        "tokens_per_evaluation": int(tokens[:, 1:].numel()),
        "plans": args.plans,
        "dense_forward_s": statistics.median(dense_s),
        "eval_s": statistics.median(eval_s),
        "eval_over_dense": statistics.median(eval_s) / statistics.median(dense_s),
        "first_eval_s": eval_s[0],
        "store_build_s": report.seconds,
        "store_built": report.built,
        "store_reused": report.reused,
        "store_bytes": report.disk_bytes,
        "packed_bytes": report.packed_bytes,
        "store_over_packed": report.disk_bytes / report.packed_bytes,
    }


def _space(spec: SessionSpec, text: str) -> SearchSpace:
    from budgetpress.evaluators import profile_source, resolve_model

    profile = profile_source(resolve_model(spec.model))
    return SearchSpace.for_dimensions(profile, parse_dimensions(text), context=spec.workload.context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--plans", type=int, default=12, help="random plans to evaluate")
    parser.add_argument("--space", default="bits,sparsity,rank", help="dimensions of the plans (no kv: see docs)")
    parser.add_argument("--store", type=Path, default=None, help="level store folder (default: a fresh temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "kv" in parse_dimensions(args.space):
        parser.error("--space must not include kv: this bench compares against one dense forward over the same tokens")
    if args.store is not None:
        figures = measure(args, args.store)
    else:
        with tempfile.TemporaryDirectory(prefix="budgetpress-store-") as folder:
            figures = measure(args, Path(folder))
    for key, value in figures.items():
        print(f"{key:>22}: {value}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
