"""The Pareto and allocation plots: what they are drawn from, and that they are PNG images."""

from __future__ import annotations

from budgetpress.dashboard import allocation_of, allocation_png, pareto_png, pareto_points, study_plot, study_points
from budgetpress.dashboard._plots import Point
from budgetpress.space import KVSetting, LinearSetting, Plan, SparsityPattern
from tests.dashboard.conftest import load, toy_space
from tests.search.conftest import toy_profile

PNG = b"\x89PNG\r\n\x1a\n"


def _point(trial: int, memory: int, kl: float) -> Point:
    return Point(trial=trial, memory_bytes=memory, kl=kl, label="", feasible=True)


def test_pareto_points_keep_only_undominated_trials() -> None:
    points = [_point(0, 100, 0.5), _point(1, 200, 0.6), _point(2, 200, 0.2), _point(3, 300, 0.2), _point(4, 50, 0.9)]
    assert [p.trial for p in pareto_points(points)] == [4, 0, 2]


def test_study_points_mark_uniform_plans_and_feasibility(study_db: str) -> None:
    study = load(study_db)
    points = study_points(study)
    assert len(points) == len(study.trials)
    uniform = {p.trial for p in points if p.label}
    assert uniform == {t.number for t in study.trials if t.user_attrs["strategy"] == "uniform"}
    budget = study.trials[0].user_attrs["budget_bytes"]
    assert all(p.feasible == (p.memory_bytes <= budget) for p in points)


def test_study_plots_are_png(study_db: str) -> None:
    study = load(study_db)
    for data in (pareto_png(study), study_plot(study, "allocation")):
        assert data.startswith(PNG) and len(data) > 10_000


def test_allocation_lays_out_every_unit_by_layer_and_role() -> None:
    profile = toy_profile(n_layers=2)
    q0 = "model.layers.0.self_attn.q_proj"
    sparse = LinearSetting(bits=16, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4)
    plan = Plan({q0: LinearSetting(bits=4), "model.layers.1.mlp.up_proj": sparse, "kv.1": KVSetting(bits=2)})
    alloc = allocation_of(plan, profile)
    assert alloc.layers == [0, 1] and alloc.roles == ["q_proj", "k_proj", "up_proj", "down_proj"]
    assert alloc.linear[(0, "q_proj")].bits == 4 and alloc.linear[(1, "up_proj")].sparsity == 0.5
    assert alloc.linear[(1, "q_proj")].is_dense and alloc.kv[0].is_dense and alloc.kv[1].bits == 2
    from_keys = allocation_of(plan)  # without a profile: only the plan's own units
    assert from_keys.linear.keys() == {(0, "q_proj"), (1, "up_proj")} and set(from_keys.kv) == {1}
    assert allocation_png(plan, profile).startswith(PNG)


def test_allocation_png_of_a_full_space_plan() -> None:
    costed = toy_space()
    plan = costed.space.uniform_plans()[-1]
    assert allocation_png(plan, costed.space.profile, title="last uniform plan").startswith(PNG)
