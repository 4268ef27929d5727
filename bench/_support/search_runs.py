"""The runs behind bench/search_quality.py: one strategy, one space, one budget, one row."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import optuna

from budgetpress.evaluators import SessionSpec, TokenSpec, build_store, open_session
from budgetpress.evaluators._evaluator import PlanEvaluator
from budgetpress.search import (
    Controller,
    CostedSpace,
    EvolutionaryStrategy,
    HybridStrategy,
    IntegerProgramStrategy,
    Ledger,
    Outcome,
    RandomStrategy,
    Strategy,
    TPEStrategy,
    TrialRecord,
    UniformStrategy,
    sampler_for,
    solve_mckp,
    stages_for,
)
from budgetpress.space import (
    KVSetting,
    LinearSetting,
    Plan,
    SearchSpace,
    Split,
    Workload,
    parse_dimensions,
    plan_bytes,
)

# Trials for the integer program: it stops by itself after measuring and verifying.
_UNBOUNDED = 1_000_000


@dataclass(frozen=True)
class Counts:
    """Trials per strategy; ``hybrid`` None: the integer program's own count and 60 more."""

    random: int
    tpe: int
    evolution: int
    hybrid: int | None


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str
    seed: int
    seq_len: int
    calibration_sequences: int
    evaluation_sequences: int
    counts: Counts
    log: Callable[[str], None] | None = None
    workload: Workload = field(default_factory=Workload)


@dataclass(frozen=True)
class Cell:
    space: str
    budget: str
    strategy: str


@dataclass(frozen=True, kw_only=True)
class Row:
    budget: str
    budget_bytes: int
    space: str
    strategy: str
    evals: int
    kl: float
    ppl: float
    memory_bytes: int
    evals_to_5pct: int
    calibration_kl: float
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CachedEvaluate:
    """Evaluations in-process, cached by (plan, split, fidelity): an evaluation is deterministic."""

    def __init__(self, evaluator: PlanEvaluator) -> None:
        self._evaluator = evaluator
        self._cache: dict[tuple[str, Split, int | None], Outcome] = {}
        self.computed = 0

    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]:
        return [self.one(plan, Split.CALIBRATION, max_tokens) for plan in plans]

    def one(self, plan: Plan, split: Split, max_tokens: int | None = None) -> Outcome:
        key = (plan.key, split, max_tokens)
        if key not in self._cache:
            self.computed += 1
            self._cache[key] = Outcome(result=self._evaluator.evaluate(plan, split=split, max_tokens=max_tokens))
        return self._cache[key]


def budget_plan(space: SearchSpace, name: str) -> Plan:
    """The plan whose memory defines the budget ``name``: uniform 3- or 4-bit weights, maybe 4-bit KV."""
    bits = {"uniform-3bit": 3, "uniform-4bit": 4, "uniform-4bit+kv4": 4}[name]
    group = next(c.group_size for c in space.linear_choices if c.bits == bits)
    settings: dict[str, LinearSetting | KVSetting] = {
        u.key: LinearSetting(bits=bits, group_size=group) for u in space.profile.linear_units
    }
    if name.endswith("+kv4"):
        settings.update({u.key: KVSetting(bits=4) for u in space.profile.kv_units})
    return Plan(settings)


class SearchBench:
    """One session of the model; spaces, budgets and uniform baselines made once and shared by rows."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self._spec = SessionSpec(
            model=config.model,
            workload=config.workload,
            tokens=TokenSpec(
                seq_len=config.seq_len,
                calibration_sequences=config.calibration_sequences,
                evaluation_sequences=config.evaluation_sequences,
                seed=config.seed,
            ),
        )
        self._session = open_session(self._spec)
        self._evaluate = CachedEvaluate(self._session.evaluator)
        self._costed: dict[str, CostedSpace] = {}
        self._uniform: dict[tuple[str, str], Row] = {}
        self._uniform_plan_json: dict[tuple[str, str], str] = {}
        self._stages = stages_for(config.seq_len * config.calibration_sequences)

    @property
    def evaluate(self) -> CachedEvaluate:
        """The session's evaluations, cached across rows."""
        return self._evaluate

    def _log(self, text: str) -> None:
        if self.config.log is not None:
            self.config.log(text)

    def costed(self, space_text: str) -> CostedSpace:
        if space_text not in self._costed:
            dims = parse_dimensions(space_text)
            space = SearchSpace.for_dimensions(self._session.profile, dims, context=self.config.workload.context)
            self._log(f"level store for {space_text}")
            build_store(self._spec, space, progress=self.config.log is not None)
            self._costed[space_text] = CostedSpace(space, self.config.workload)
        return self._costed[space_text]

    def budget_bytes(self, cell: Cell) -> int:
        costed = self.costed(cell.space)
        return plan_bytes(costed.space.profile, budget_plan(costed.space, cell.budget), self.config.workload)

    def run(self, cell: Cell) -> Row:
        if cell.strategy == "uniform":
            return self._uniform_row(cell)
        uniform = self._uniform_row(Cell(space=cell.space, budget=cell.budget, strategy="uniform"))
        started = time.perf_counter()
        costed, budget = self.costed(cell.space), self.budget_bytes(cell)
        uniform_plan = Plan.from_json(self._uniform_plan_json[(cell.space, cell.budget)])
        study = optuna.create_study(direction="minimize", sampler=sampler_for(_sampler_name(cell), self.config.seed))
        ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
        strategy, n_trials = self._strategy(cell, ledger, costed, budget, uniform_plan)
        records = Controller(
            strategy=strategy,
            ledger=ledger,
            profile=costed.space.profile,
            workload=self.config.workload,
            evaluate=self._evaluate,
            batch_size=1,
        ).run(n_trials)
        row = self._row(cell, budget, records, started)
        self._log(
            f"{cell.space:<19} {cell.budget:<17} {cell.strategy:<7} evals {row.evals:>5}  held-out KL "
            f"{row.kl:.5g} ({row.kl / uniform.kl:.3f}× uniform)  {row.seconds:.0f} s"
        )
        return row

    def _strategy(
        self, cell: Cell, ledger: Ledger, costed: CostedSpace, budget: int, uniform: Plan
    ) -> tuple[Strategy, int]:
        counts, seed = self.config.counts, self.config.seed
        if cell.strategy == "random":
            return RandomStrategy(costed=costed, budget_bytes=budget, seed=seed), counts.random
        if cell.strategy == "tpe-plain":
            tpe = TPEStrategy(ledger=ledger, costed=costed, budget_bytes=budget, seed=seed, initial_plans=[uniform])
            return tpe, counts.tpe
        # The integer program measures from the best uniform plan, its operating point.
        base = costed.space.choices_of(uniform)
        if cell.strategy == "tpe":
            warm = HybridStrategy(costed=costed, budget_bytes=budget, seed=seed, then="tpe", ledger=ledger, base=base)
            return warm, counts.tpe
        if cell.strategy == "evo":
            evolution = EvolutionaryStrategy(
                costed=costed, budget_bytes=budget, seed=seed, initial_plans=[uniform], stages=self._stages
            )
            return evolution, counts.evolution
        if cell.strategy == "ilp":
            return IntegerProgramStrategy(costed=costed, budget_bytes=budget, seed=seed, base=base), _UNBOUNDED
        if cell.strategy == "hybrid":
            hybrid = HybridStrategy(
                costed=costed, budget_bytes=budget, seed=seed, initial_plans=[uniform], stages=self._stages, base=base
            )
            n = counts.hybrid
            if n is None:
                n = _integer_trials(costed, budget, base) + 60
            return hybrid, n
        raise ValueError(f"unknown strategy {cell.strategy!r}")

    def _uniform_row(self, cell: Cell) -> Row:
        """The best uniform plan that fits: every uniform plan of the space within the budget, evaluated."""
        key = (cell.space, cell.budget)
        if key not in self._uniform:
            started = time.perf_counter()
            costed, budget = self.costed(cell.space), self.budget_bytes(cell)
            uniform = UniformStrategy(costed=costed, budget_bytes=budget)
            plans = uniform.ask(len(costed.space.uniform_plans()))
            for plan in plans:
                uniform.tell(plan, self._evaluate.one(plan, Split.CALIBRATION))
            assert uniform.best is not None, "every uniform plan failed"
            best, fitness = uniform.best
            self._uniform_plan_json[key] = best.to_json()
            self._uniform[key] = self._finish(cell, budget, best, fitness, len(plans), len(plans), started)
            self._log(f"{cell.space:<19} {cell.budget:<17} uniform best {best_label(best)} KL {fitness:.5g}")
        return self._uniform[key]

    def _row(self, cell: Cell, budget: int, records: list[TrialRecord], started: float) -> Row:
        trajectory = _incumbents(records)
        if not trajectory:
            raise RuntimeError(f"{cell}: no full-fidelity evaluation succeeded")
        _, final_fitness, best = trajectory[-1]
        to_5pct = next(number for number, fitness, _ in trajectory if fitness <= 1.05 * final_fitness)
        return self._finish(cell, budget, best, final_fitness, len(records), to_5pct, started)

    def _finish(
        self, cell: Cell, budget: int, plan: Plan, fitness: float, evals: int, to_5pct: int, started: float
    ) -> Row:
        held_out = self._evaluate.one(plan, Split.EVALUATION).result
        assert held_out is not None
        return Row(
            budget=cell.budget,
            budget_bytes=budget,
            space=cell.space,
            strategy=cell.strategy,
            evals=evals,
            kl=held_out.kl,
            ppl=held_out.ppl,
            memory_bytes=held_out.memory_bytes,
            evals_to_5pct=to_5pct,
            calibration_kl=fitness,
            seconds=round(time.perf_counter() - started, 1),
        )


def _sampler_name(cell: Cell) -> str:
    # The warm-started TPE switches its study to TPE's sampler when the integer program is done.
    return "tpe" if cell.strategy == "tpe-plain" else "random"


def _incumbents(records: list[TrialRecord]) -> list[tuple[int, float, Plan]]:
    """(trials so far, fitness, plan) each time a full-fidelity evaluation set a new best."""
    best = float("inf")
    trajectory = []
    for index, record in enumerate(records, start=1):
        fitness = record.outcome.fitness
        fidelity = record.outcome.result.fidelity if record.outcome.result is not None else None
        if fitness is not None and fidelity is None and fitness < best:
            best = fitness
            trajectory.append((index, fitness, record.plan))
    return trajectory


def _integer_trials(costed: CostedSpace, budget: int, base: dict[str, int]) -> int:
    """The integer program's measurements (the base and one per reachable group and choice) and the
    plans it verifies: a count from the space alone, before anything is evaluated."""
    probe = IntegerProgramStrategy(costed=costed, budget_bytes=budget, seed=0, base=base)
    return 1 + sum(len(row) - 1 for row in probe.sensitivity.values()) - len(probe.excluded) + 4


def best_label(plan: Plan) -> str:
    labels = sorted({setting.label() for setting in plan.values()})
    return "+".join(labels)


def ilp_solve_seconds(n_units: int = 10_000, n_settings: int = 32, seed: int = 0) -> float:
    """Seconds to solve a synthetic multiple-choice knapsack exactly (best of three runs): each unit
    a trade-off (dearer settings lose less), the capacity 40% of the way from cheapest to dearest."""
    rng = np.random.default_rng(seed)
    costs = np.sort(rng.integers(0, 10**8, size=(n_units, n_settings)), axis=1)
    values = np.sort(rng.random((n_units, n_settings)), axis=1)[:, ::-1]
    lowest, highest = int(costs[:, 0].sum()), int(costs[:, -1].sum())
    capacity = lowest + (highest - lowest) * 2 // 5
    cost_rows, value_rows = costs.tolist(), values.tolist()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        solve_mckp(cost_rows, value_rows, capacity)
        times.append(time.perf_counter() - started)
    return round(min(times), 3)
