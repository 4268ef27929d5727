"""One whole search: profile, budget, uniform baseline, strategy, held-out report.

The CLI runs this directly; the service's job runner will run the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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
    Ledger,
    StrategySetup,
    TrialRecord,
    UniformStrategy,
    best_plan,
    known_fitness_of,
    make_strategy,
    open_study,
    stages_for,
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
from budgetpress.workers._export_job import SESSION_ATTR, session_record
from budgetpress.workers._pool import WorkerPool, WorkerSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    """One search. Several ``budgets`` make a frontier search: the best plan for each, found by
    one strategy run per budget in one study that shares every evaluation; ``n_trials`` is per
    budget. ``resume`` continues the study ``study_name`` (which must exist) where it stopped."""

    model: str
    budgets: tuple[Budget, ...]
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
    resume: bool = False


@dataclass(frozen=True, kw_only=True)
class PlanReport:
    plan: Plan
    memory_bytes: int
    kl: float
    ppl: float

    def to_dict(self) -> dict[str, Any]:
        return {"plan_key": self.plan.key, "memory_bytes": self.memory_bytes, "kl": self.kl, "ppl": self.ppl}


@dataclass(frozen=True, kw_only=True)
class BudgetReport:
    """One budget's outcome: the best plan found and the best uniform plan, on held-out tokens."""

    budget: Budget
    budget_bytes: int
    best: PlanReport
    uniform: PlanReport
    best_trial: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget),
            "budget_bytes": self.budget_bytes,
            "best": {
                **self.best.to_dict(),
                "trial": self.best_trial,
                "dimensions_used": sorted(d.value for d in plan_dimensions(self.best.plan)),
                "plan": {k: s.label() for k, s in self.best.plan.items()},
            },
            "uniform": self.uniform.to_dict(),
        }


@dataclass(frozen=True, kw_only=True)
class FrontPoint:
    """A plan on the quality/memory Pareto front of a study's full-fidelity calibration trials."""

    trial: int
    plan_key: str
    memory_bytes: int
    kl: float

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "plan_key": self.plan_key, "memory_bytes": self.memory_bytes, "kl": self.kl}


@dataclass(frozen=True, kw_only=True)
class SearchReport:
    request: SearchRequest
    space: SearchSpace
    dense_bytes: int
    n_trials: int
    n_complete: int
    budgets: tuple[BudgetReport, ...]
    pareto: tuple[FrontPoint, ...]
    dense_ppl: float
    level_store: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> BudgetReport:
        """The first budget asked for (the only one, unless this is a frontier search)."""
        return self.budgets[0]

    @property
    def best(self) -> PlanReport:
        return self.first.best

    @property
    def uniform(self) -> PlanReport:
        return self.first.uniform

    @property
    def budget_bytes(self) -> int:
        return self.first.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        first = self.first.to_dict()
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
            "best": first["best"],
            "uniform": first["uniform"],
            "frontier": [b.to_dict() for b in self.budgets],
            "pareto": [p.to_dict() for p in self.pareto],
            "dense": {"ppl": self.dense_ppl},
            "level_store": self.level_store,
            "kl_split": Split.EVALUATION.value,
            "pareto_split": Split.CALIBRATION.value,
        }


class Progress(Protocol):
    """What a search reports while it runs; the CLI draws a bar, the service stores fields."""

    shows_bars: bool

    def stage(self, text: str) -> None: ...

    def trial(self, record: TrialRecord, done: int, total: int) -> None: ...

    def check(self) -> None:
        """Raise to stop the search; called before every batch of plans, so a stop never waits for a trial."""


class _Silent:
    shows_bars = False

    def stage(self, text: str) -> None:
        logger.info("%s", text)

    def trial(self, record: TrialRecord, done: int, total: int) -> None:
        logger.debug("trial %d (%d/%d)", record.number, done, total)

    def check(self) -> None:
        """Never stops a search."""


def check_request(request: SearchRequest) -> tuple[SearchSpace, CostedSpace, list[int]]:
    """Validate everything that needs no worker: model, text files, budgets, space; the budgets
    in bytes, in the order given."""
    if request.n_trials < 1:
        raise ValueError(f"trials must be at least 1; got {request.n_trials}")
    if request.n_workers < 1:
        raise ValueError(f"workers must be at least 1; got {request.n_workers}")
    if request.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {request.strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if not request.budgets:
        raise ValueError("give at least one budget")
    check_text_files(request.text_files)
    Methods.parse(request.methods)
    profile = profile_source(resolve_model(request.model))
    space = SearchSpace.for_dimensions(
        profile, request.dimensions, context=request.workload.context, grouping=request.grouping
    )
    costed = CostedSpace(space, request.workload)
    budgets = [budget.resolve(costed.dense_bytes) for budget in request.budgets]
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets {', '.join(map(str, request.budgets))} repeat a size ({budgets} bytes)")
    for budget, budget_bytes in zip(request.budgets, budgets, strict=True):
        if costed.cheapest_bytes() > budget_bytes:
            raise ValueError(
                f"budget {budget} is {budget_bytes} bytes, below the smallest possible plan "
                f"({costed.cheapest_bytes()} bytes, {costed.cheapest_bytes() / costed.dense_bytes:.1%} "
                f"of the dense {costed.dense_bytes}); raise the budget"
            )
    return space, costed, budgets


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


def _uniform_baselines(
    pool: WorkerPool, costed: CostedSpace, budgets: list[int], progress: Progress
) -> dict[int, Plan]:
    """The best uniform plan for each budget; each uniform plan is evaluated once for all of them."""
    uniform = UniformStrategy(costed=costed, budget_bytes=max(budgets))
    plans = uniform.ask(len(costed.space.uniform_plans()))
    progress.stage(f"evaluating the {len(plans)} uniform baselines that fit (one setting for every unit)")
    fitness: dict[str, float] = {}
    for start in range(0, len(plans), pool.size):
        batch = plans[start : start + pool.size]
        for plan, outcome in zip(batch, pool.evaluate(batch), strict=True):
            if outcome.fitness is not None:
                fitness[plan.key] = outcome.fitness
        progress.stage(f"uniform baselines: {min(start + pool.size, len(plans))}/{len(plans)} evaluated")
    best = {}
    for budget in budgets:
        fitting = [p for p in plans if p.key in fitness and costed.bytes_of(costed.space.choices_of(p)) <= budget]
        if not fitting:
            raise RuntimeError(f"every uniform plan that fits {budget} bytes failed to evaluate")
        best[budget] = min(fitting, key=lambda p: fitness[p.key])
    return best


def _budget_setup(
    request: SearchRequest,
    study: optuna.Study,
    costed: CostedSpace,
    budgets: list[int],
    budget: int,
    uniform: Mapping[int, Plan],
) -> StrategySetup:
    """How the strategy for ``budget`` starts. The integer program measures from the best uniform
    plan, its operating point; a frontier search scopes each budget's state in the shared study,
    measures from one base (the smallest budget's best uniform plan, its measurements made to fit
    that budget), and hands each strategy what the study has evaluated already."""
    frontier = len(budgets) > 1
    return StrategySetup(
        initial_plans=[uniform[budget]],
        resume=request.resume,
        stages=stages_for(request.seq_len * request.calibration_sequences),
        scope=f"budget.{budget}" if frontier else "",
        known_fitness=known_fitness_of(study) if frontier else {},
        base=costed.space.choices_of(uniform[min(budgets)]),
        measure_budget=min(budgets) if frontier else None,
    )


def _trials_left(request: SearchRequest, study: optuna.Study, budget: int, n_budgets: int) -> int:
    """Trials still to run for ``budget``: all of them, or on resume those its earlier run lacked
    (trials failed as interrupted, or never evaluated, do not count: they were not run)."""
    if not request.resume:
        return request.n_trials
    ran = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("not_evaluated")]
    if n_budgets > 1:  # a single-budget study's trials all count, whatever budget they recorded
        ran = [t for t in ran if t.user_attrs.get("budget_bytes") == budget]
    return max(0, request.n_trials - len(ran))


def _fail_interrupted(study: optuna.Study) -> None:
    """Fail the trials a killed run left running: their evaluations never came back."""
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial = optuna.Trial(study, frozen._trial_id)
        trial.set_user_attr("not_evaluated", True)
        trial.set_user_attr("fail_reason", "interrupted: the search stopped before its evaluation came back")
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        logger.warning("trial %d of study %s was left running; failed it", frozen.number, study.study_name)


def _heldout(pool: WorkerPool, plans: list[Plan]) -> list[Result]:
    results = []
    for plan, outcome in zip(plans, pool.evaluate(plans, split=Split.EVALUATION), strict=True):
        if outcome.result is None:
            raise RuntimeError(f"held-out evaluation of plan {plan.key[:12]} failed: {outcome.failure}")
        results.append(outcome.result)
    return results


def run_search(request: SearchRequest, progress: Progress | None = None) -> SearchReport:
    progress = progress or _Silent()
    space, costed, budgets = check_request(request)
    study = open_study(
        storage=request.storage,
        name=request.study_name,
        seed=request.seed,
        strategy=request.strategy,
        resume=request.resume,
    )
    if request.resume:
        _fail_interrupted(study)
    progress.stage(f"level store under {request.store_root}: every unit at every choice, computed once")
    store = build_store(session_spec(request), space, progress=progress.shows_bars)
    study.set_user_attr("level_store", asdict(store))
    study.set_user_attr(SESSION_ATTR, session_record(session_spec(request)))
    progress.stage(f"starting {request.n_workers} Ray worker(s)")
    with WorkerPool(_worker_spec(request), n_workers=request.n_workers) as pool:
        uniform = _uniform_baselines(pool, costed, budgets, progress)
        _search_each_budget(request, study, pool, costed, budgets, uniform, progress)
        progress.stage("measuring the best plans on held-out tokens")
        reports, dense_ppl = _heldout_reports(request, study, pool, budgets, uniform)
    report = SearchReport(
        request=request,
        space=space,
        dense_bytes=costed.dense_bytes,
        n_trials=len(study.trials),
        n_complete=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        budgets=reports,
        pareto=pareto_front(study),
        dense_ppl=dense_ppl,
        level_store=asdict(store),
    )
    study.set_user_attr("report", report.to_dict())
    return report


def _search_each_budget(
    request: SearchRequest,
    study: optuna.Study,
    pool: WorkerPool,
    costed: CostedSpace,
    budgets: list[int],
    uniform: dict[int, Plan],
    progress: Progress,
) -> None:
    """One controller run per budget, in the order given, all recording into ``study``."""
    total = request.n_trials * len(budgets)
    done = [total - sum(_trials_left(request, study, b, len(budgets)) for b in budgets)]

    def on_trial(record: TrialRecord) -> None:
        done[0] += 1
        progress.trial(record, done[0], total)

    for budget in budgets:
        left = _trials_left(request, study, budget, len(budgets))
        if not left:
            continue
        if len(budgets) > 1:
            progress.stage(f"searching the budget of {budget} bytes ({request.strategy}, {left} trials)")
        ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
        setup = _budget_setup(request, study, costed, budgets, budget, uniform)
        strategy = make_strategy(
            request.strategy, ledger=ledger, costed=costed, budget_bytes=budget, seed=request.seed, setup=setup
        )
        Controller(
            strategy=strategy,
            ledger=ledger,
            profile=costed.space.profile,
            workload=request.workload,
            evaluate=pool.evaluate,
            batch_size=pool.size,
            on_trial=on_trial,
            before_batch=progress.check,
        ).run(left)


def _heldout_reports(
    request: SearchRequest, study: optuna.Study, pool: WorkerPool, budgets: list[int], uniform: dict[int, Plan]
) -> tuple[tuple[BudgetReport, ...], float]:
    """Each budget's best and uniform plans, and the dense model, measured on held-out tokens."""
    bests = [best_plan(study, budget_bytes=budget) for budget in budgets]
    plans = {plan.key: plan for plan, _ in bests} | {p.key: p for p in uniform.values()} | {"dense": Plan({})}
    measured = dict(zip(plans, _heldout(pool, list(plans.values())), strict=True))
    reports = tuple(
        BudgetReport(
            budget=request_budget,
            budget_bytes=budget,
            best=_plan_report(plan, measured[plan.key]),
            uniform=_plan_report(uniform[budget], measured[uniform[budget].key]),
            best_trial=trial.number,
        )
        for request_budget, budget, (plan, trial) in zip(request.budgets, budgets, bests, strict=True)
    )
    return reports, measured["dense"].ppl


def pareto_front(study: optuna.Study) -> tuple[FrontPoint, ...]:
    """The full-fidelity calibration trials that no other beats on both memory and KL, by memory."""
    points = sorted(
        (
            FrontPoint(
                trial=t.number, plan_key=t.user_attrs["plan_key"], memory_bytes=t.user_attrs["memory_bytes"], kl=t.value
            )
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and t.user_attrs.get("fidelity") is None and "plan_key" in t.user_attrs
        ),
        key=lambda p: (p.memory_bytes, p.kl, p.trial),
    )
    front: list[FrontPoint] = []
    for point in points:
        if not front or point.kl < front[-1].kl:
            front.append(point)
    return tuple(front)


def _plan_report(plan: Plan, result: Result) -> PlanReport:
    return PlanReport(plan=plan, memory_bytes=result.memory_bytes, kl=result.kl, ppl=result.ppl)
