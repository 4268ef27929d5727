"""One whole search: profile, budget, uniform baseline, strategy, held-out report.

The CLI runs this directly; the service's job runner will run the same function.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import optuna

from budgetpress.evaluators import (
    SEARCH_METHODS,
    KVTokenSpec,
    Methods,
    SessionSpec,
    TokenSpec,
    build_store,
    check_text_files,
    default_store_root,
    profile_source,
    resolve_model,
)
from budgetpress.search import (
    STRATEGIES,
    Controller,
    CostedSpace,
    EvolutionaryStrategy,
    Ledger,
    Strategy,
    TPEStrategy,
    TrialRecord,
    UniformStrategy,
    best_plan,
    open_study,
)
from budgetpress.space import (
    Budget,
    Dimension,
    Grouping,
    Plan,
    Result,
    SearchSpace,
    Split,
    Workload,
    plan_dimensions,
)
from budgetpress.workers._pool import WorkerPool, WorkerSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    model: str
    budget: Budget
    workload: Workload
    strategy: str
    n_trials: int
    storage: str
    study_name: str
    n_workers: int
    seed: int
    grouping: Grouping = Grouping.UNIT
    dimensions: frozenset[Dimension] = frozenset({Dimension.BITS})
    methods: str = SEARCH_METHODS
    store_root: str = field(default_factory=lambda: str(default_store_root()))
    text_files: tuple[str, ...] = ()
    seq_len: int = 512
    calibration_sequences: int = 16
    evaluation_sequences: int = 16


@dataclass(frozen=True, kw_only=True)
class PlanReport:
    plan: Plan
    memory_bytes: int
    kl: float
    ppl: float

    def to_dict(self) -> dict[str, Any]:
        return {"plan_key": self.plan.key, "memory_bytes": self.memory_bytes, "kl": self.kl, "ppl": self.ppl}


@dataclass(frozen=True, kw_only=True)
class SearchReport:
    request: SearchRequest
    space: SearchSpace
    budget_bytes: int
    dense_bytes: int
    n_trials: int
    n_complete: int
    best: PlanReport
    uniform: PlanReport
    dense_ppl: float
    level_store: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.request.study_name,
            "storage": self.request.storage,
            "strategy": self.request.strategy,
            "seed": self.request.seed,
            "n_trials": self.n_trials,
            "n_complete": self.n_complete,
            "budget_bytes": self.budget_bytes,
            "dense_bytes": self.dense_bytes,
            "space": sorted(d.value for d in self.request.dimensions),
            "methods": self.request.methods,
            "best": {
                **self.best.to_dict(),
                "dimensions_used": sorted(d.value for d in plan_dimensions(self.best.plan)),
                "plan": {k: s.label() for k, s in self.best.plan.items()},
            },
            "uniform": self.uniform.to_dict(),
            "dense": {"ppl": self.dense_ppl},
            "level_store": self.level_store,
            "kl_split": Split.EVALUATION.value,
        }


class Progress(Protocol):
    """What a search reports while it runs; the CLI draws a bar, the service stores fields."""

    shows_bars: bool

    def stage(self, text: str) -> None: ...

    def trial(self, record: TrialRecord, done: int, total: int) -> None: ...


class _Silent:
    shows_bars = False

    def stage(self, text: str) -> None:
        logger.info("%s", text)

    def trial(self, record: TrialRecord, done: int, total: int) -> None:
        logger.debug("trial %d (%d/%d)", record.number, done, total)


def check_request(request: SearchRequest) -> tuple[SearchSpace, CostedSpace, int]:
    """Validate everything that needs no worker: model, text files, budget, space."""
    if request.n_trials < 1:
        raise ValueError(f"trials must be at least 1; got {request.n_trials}")
    if request.n_workers < 1:
        raise ValueError(f"workers must be at least 1; got {request.n_workers}")
    check_text_files(request.text_files)
    Methods.parse(request.methods)
    profile = profile_source(resolve_model(request.model))
    space = SearchSpace.for_dimensions(
        profile, request.dimensions, context=request.workload.context, grouping=request.grouping
    )
    costed = CostedSpace(space, request.workload)
    budget_bytes = request.budget.resolve(costed.dense_bytes)
    if costed.cheapest_bytes() > budget_bytes:
        raise ValueError(
            f"budget {request.budget} is {budget_bytes} bytes, below the smallest possible plan "
            f"({costed.cheapest_bytes()} bytes, {costed.cheapest_bytes() / costed.dense_bytes:.1%} "
            f"of the dense {costed.dense_bytes}); raise the budget"
        )
    return space, costed, budget_bytes


def session_spec(request: SearchRequest) -> SessionSpec:
    tokens = TokenSpec(
        seq_len=request.seq_len,
        calibration_sequences=request.calibration_sequences,
        evaluation_sequences=request.evaluation_sequences,
        seed=request.seed,
        text_files=request.text_files,
    )
    kv_tokens = None
    if Dimension.KV in request.dimensions:
        kv_tokens = KVTokenSpec(
            calibration_sequences=request.calibration_sequences,
            evaluation_sequences=request.evaluation_sequences,
            seed=request.seed,
            text_files=request.text_files,
        )
    return SessionSpec(
        model=request.model,
        workload=request.workload,
        tokens=tokens,
        store_root=request.store_root,
        methods=request.methods,
        kv_tokens=kv_tokens,
    )


def _worker_spec(request: SearchRequest) -> WorkerSpec:
    # A local model must never make workers reach for the hub (transformers retries for ~50 s).
    local = resolve_model(request.model).local_dir is not None
    return WorkerSpec(session=session_spec(request), env={"HF_HUB_OFFLINE": "1"} if local else {})


def _best_uniform(pool: WorkerPool, costed: CostedSpace, budget_bytes: int, progress: Progress) -> Plan:
    uniform = UniformStrategy(costed=costed, budget_bytes=budget_bytes)
    plans = uniform.ask(len(costed.space.uniform_plans()))
    progress.stage(f"evaluating the {len(plans)} uniform baselines that fit (one setting for every unit)")
    for start in range(0, len(plans), pool.size):
        batch = plans[start : start + pool.size]
        for plan, outcome in zip(batch, pool.evaluate(batch), strict=True):
            uniform.tell(plan, outcome)
        progress.stage(f"uniform baselines: {min(start + pool.size, len(plans))}/{len(plans)} evaluated")
    if uniform.best is None:
        raise RuntimeError("every uniform plan that fits the budget failed to evaluate")
    return uniform.best[0]


def _make_strategy(
    request: SearchRequest, ledger: Ledger, costed: CostedSpace, budget_bytes: int, uniform_plan: Plan
) -> Strategy:
    if request.strategy == "tpe":
        return TPEStrategy(
            ledger=ledger, costed=costed, budget_bytes=budget_bytes, seed=request.seed, initial_plans=[uniform_plan]
        )
    if request.strategy == "uniform":
        return UniformStrategy(costed=costed, budget_bytes=budget_bytes)
    if request.strategy == "evolution":
        return EvolutionaryStrategy(
            costed=costed,
            budget_bytes=budget_bytes,
            seed=request.seed,
            study=ledger.study,
            initial_plans=[uniform_plan],
        )
    raise ValueError(f"unknown strategy {request.strategy!r}; accepted: {', '.join(STRATEGIES)}")


def _heldout(pool: WorkerPool, plans: list[Plan]) -> list[Result]:
    results = []
    for plan, outcome in zip(plans, pool.evaluate(plans, split=Split.EVALUATION), strict=True):
        if outcome.result is None:
            raise RuntimeError(f"held-out evaluation of plan {plan.key[:12]} failed: {outcome.failure}")
        results.append(outcome.result)
    return results


def run_search(request: SearchRequest, progress: Progress | None = None) -> SearchReport:
    progress = progress or _Silent()
    space, costed, budget_bytes = check_request(request)
    study = open_study(storage=request.storage, name=request.study_name, seed=request.seed, strategy=request.strategy)
    progress.stage(f"level store under {request.store_root}: every unit at every choice, computed once")
    store = build_store(session_spec(request), space, progress=progress.shows_bars)
    study.set_user_attr("level_store", asdict(store))
    progress.stage(f"starting {request.n_workers} Ray worker(s)")
    with WorkerPool(_worker_spec(request), n_workers=request.n_workers) as pool:
        uniform_plan = _best_uniform(pool, costed, budget_bytes, progress)
        ledger = Ledger(study=study, space=space, budget_bytes=budget_bytes)
        strategy = _make_strategy(request, ledger, costed, budget_bytes, uniform_plan)
        done = [0]

        def on_trial(record: TrialRecord) -> None:
            done[0] += 1
            progress.trial(record, done[0], request.n_trials)

        Controller(
            strategy=strategy,
            ledger=ledger,
            profile=space.profile,
            workload=request.workload,
            evaluate=pool.evaluate,
            batch_size=pool.size,
            on_trial=on_trial,
        ).run(request.n_trials)
        progress.stage("measuring the best plans on held-out tokens")
        best, best_trial = best_plan(study)
        best_result, uniform_result, dense_result = _heldout(pool, [best, uniform_plan, Plan({})])
    report = SearchReport(
        request=request,
        space=space,
        budget_bytes=budget_bytes,
        dense_bytes=costed.dense_bytes,
        n_trials=len(study.trials),
        best=_plan_report(best, best_result),
        uniform=_plan_report(uniform_plan, uniform_result),
        n_complete=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        dense_ppl=dense_result.ppl,
        level_store=asdict(store),
    )
    study.set_user_attr("report", report.to_dict())
    logger.info("best trial %d of study %s", best_trial.number, request.study_name)
    return report


def _plan_report(plan: Plan, result: Result) -> PlanReport:
    return PlanReport(plan=plan, memory_bytes=result.memory_bytes, kl=result.kl, ppl=result.ppl)
