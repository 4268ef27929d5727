"""The plots a study gets, as PNG bytes: the quality/memory Pareto front and a plan's per-layer allocation.

matplotlib runs on its Agg backend (no display); every figure is closed once written.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from budgetpress.space import KVSetting, LinearSetting, ModelProfile, Plan

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_DPI = 110
_READABLE = [patheffects.withStroke(linewidth=2, foreground="white")]  # black text on any cell colour


@dataclass(frozen=True, kw_only=True)
class Point:
    """One complete full-fidelity trial on the quality/memory plane."""

    trial: int
    memory_bytes: int
    kl: float
    label: str
    feasible: bool


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _uniform_label(plan: Plan) -> str | None:
    """The setting labels of a uniform plan (one setting per unit kind), else None."""
    linear = {s.label() for s in plan.values() if isinstance(s, LinearSetting)}
    kv = {s.label() for s in plan.values() if isinstance(s, KVSetting)}
    if len(linear) > 1 or len(kv) > 1 or not plan:
        return None
    return " + KV ".join([*sorted(linear), *sorted(kv)])


def study_points(study: optuna.Study) -> list[Point]:
    """Complete, full-fidelity trials that carry a plan (the ones a Pareto front compares)."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if trial.value is None or "plan_json" not in attrs or attrs.get("fidelity") is not None:
            continue
        if not math.isfinite(trial.value):
            continue
        memory = int(attrs.get("memory_bytes", 0))
        budget = attrs.get("budget_bytes")
        plan = Plan.from_json(attrs["plan_json"])
        points.append(
            Point(
                trial=trial.number,
                memory_bytes=memory,
                kl=float(trial.value),
                label=_uniform_label(plan) or "",
                feasible=budget is None or memory <= int(budget),
            )
        )
    return points


def pareto_points(points: list[Point]) -> list[Point]:
    """The points no other beats on both memory and KL, by memory (ties: the earlier trial)."""
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (p.memory_bytes, p.kl, p.trial)):
        if not front or point.kl < front[-1].kl:
            front.append(point)
    return front


def _budgets(study: optuna.Study) -> list[int]:
    report = study.user_attrs.get("report")
    if isinstance(report, dict) and report.get("frontier"):
        return sorted({int(b["budget_bytes"]) for b in report["frontier"]})
    found = {t.user_attrs.get("budget_bytes") for t in study.get_trials(deepcopy=False)}
    return sorted(int(b) for b in found if b is not None)


def _draw_front(ax: Axes, points: list[Point], budgets: list[int]) -> None:
    mib = 2.0**20
    others = [p for p in points if not p.label]
    ax.scatter(
        [p.memory_bytes / mib for p in others],
        [p.kl for p in others],
        s=14,
        c=["tab:blue" if p.feasible else "tab:gray" for p in others],
        alpha=0.45,
        label="trials (grey: over budget)",
    )
    front = pareto_points(points)
    ax.step(
        [p.memory_bytes / mib for p in front],
        [p.kl for p in front],
        where="post",
        color="tab:orange",
        marker="o",
        label="Pareto front",
    )
    uniform = [p for p in points if p.label]
    ax.scatter(
        [p.memory_bytes / mib for p in uniform],
        [p.kl for p in uniform],
        marker="X",
        s=70,
        c="tab:red",
        label="uniform baselines",
        zorder=3,
    )
    for p in uniform:
        ax.annotate(p.label, (p.memory_bytes / mib, p.kl), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for i, budget in enumerate(budgets):
        ax.axvline(budget / mib, color="black", linestyle=":", linewidth=1, label="budget" if i == 0 else None)


def pareto_png(study: optuna.Study) -> bytes:
    """KL (calibration, full fidelity) against memory for every complete trial of ``study``, the
    Pareto front drawn as a step line and the uniform plans (one setting for every unit) marked."""
    points = study_points(study)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if points:
        _draw_front(ax, points, _budgets(study))
        if all(p.kl > 0 for p in points):
            ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no complete full-fidelity trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("memory (MiB: weights + KV cache at the workload)")
    ax.set_ylabel("KL to the dense model (calibration)")
    ax.set_title(f"study {study.study_name}: quality vs memory ({len(points)} trials)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """A plan laid out per layer: linear roles as columns, attention layers' KV settings apart."""

    layers: list[int]
    roles: list[str]
    linear: dict[tuple[int, str], LinearSetting]
    kv: dict[int, KVSetting]


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _units_of(plan: Plan, profile: ModelProfile | None) -> tuple[list[tuple[str, int]], list[int]]:
    """(linear unit key, layer) pairs and KV layers: the profile's, else parsed from the plan's keys."""
    if profile is not None:
        return [(u.name, u.layer) for u in profile.linear_units], [u.layer for u in profile.kv_units]
    linears, kv_layers = [], []
    for key, setting in plan.items():
        if isinstance(setting, KVSetting):
            kv_layers.append(int(key.split(".")[-1]))
            continue
        match = _LAYER.search(key)
        linears.append((key, int(match.group(1)) if match else -1))
    return linears, kv_layers


def allocation_of(plan: Plan, profile: ModelProfile | None = None) -> Allocation:
    """The plan's settings by (layer, role); units the plan leaves out are dense."""
    linears, kv_layers = _units_of(plan, profile)
    linear = {}
    for key, layer in linears:
        setting = plan.get(key, LinearSetting())
        linear[(layer, _role(key))] = setting if isinstance(setting, LinearSetting) else LinearSetting()
    kv = {}
    for layer in kv_layers:
        setting = plan.get(f"kv.{layer}", KVSetting())
        kv[layer] = setting if isinstance(setting, KVSetting) else KVSetting()
    roles = list(dict.fromkeys(role for _, role in sorted(linear, key=lambda lr: lr[0])))
    layers = sorted({layer for layer, _ in linear} | set(kv))
    return Allocation(layers=layers, roles=roles, linear=linear, kv=kv)


def _grid(values: dict[tuple[int, str], float], layers: list[int], columns: list[str]) -> Any:
    grid = np.full((len(layers), len(columns)), np.nan)
    for (layer, column), value in values.items():
        grid[layers.index(layer), columns.index(column)] = value
    return grid


def _heatmap(ax: Axes, grid: Any, *, layers: list[int], columns: list[str], title: str, fmt: str, cmap: str) -> None:
    masked = np.ma.masked_invalid(grid)
    ax.imshow(masked, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_title(title, fontsize=9)
    for (row, col), value in np.ndenumerate(grid):
        text = "–" if np.isnan(value) else format(value, fmt)
        ax.text(col, row, text, ha="center", va="center", fontsize=7, path_effects=_READABLE)


def _linear_panels(alloc: Allocation) -> list[tuple[str, dict[tuple[int, str], float], str, str]]:
    bits = {k: float(s.bits) for k, s in alloc.linear.items()}
    sparsity = {k: 100.0 * s.sparsity for k, s in alloc.linear.items()}
    rank = {k: float(s.rank) for k, s in alloc.linear.items() if s.rank is not None}
    return [
        ("weight bits", bits, "g", "viridis"),
        ("sparsity %", sparsity, "g", "magma_r"),
        ("rank (– = full)", rank, "g", "cividis"),
    ]


def _kv_grid(alloc: Allocation) -> tuple[Any, Any]:
    bits = np.array([[float(alloc.kv[layer].bits)] if layer in alloc.kv else [np.nan] for layer in alloc.layers])
    kept = np.array(
        [[float(alloc.kv[layer].kept_tokens or np.nan)] if layer in alloc.kv else [np.nan] for layer in alloc.layers]
    )
    return bits, kept


def allocation_png(plan: Plan, profile: ModelProfile | None = None, *, title: str = "") -> bytes:
    """Heatmaps of the plan per layer: weight bits, sparsity and rank for each linear role, and KV
    bits and kept-token budget (– = every token) for each attention layer."""
    alloc = allocation_of(plan, profile)
    panels = _linear_panels(alloc)
    widths = [max(1, len(alloc.roles))] * len(panels) + [1, 1]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(3 + 1.1 * sum(widths), 1.5 + 0.35 * len(alloc.layers)), width_ratios=widths
    )
    for ax, (name, values, fmt, cmap) in zip(axes, panels, strict=False):
        grid = _grid(values, alloc.layers, alloc.roles)
        _heatmap(ax, grid, layers=alloc.layers, columns=alloc.roles, title=name, fmt=fmt, cmap=cmap)
    kv_bits, kv_kept = _kv_grid(alloc)
    _heatmap(axes[-2], kv_bits, layers=alloc.layers, columns=["kv"], title="KV bits", fmt="g", cmap="viridis")
    _heatmap(axes[-1], kv_kept, layers=alloc.layers, columns=["kv"], title="KV kept tokens", fmt="g", cmap="cividis")
    axes[0].set_ylabel("decoder layer")
    fig.suptitle(
        title or f"plan {plan.key[:12]}: per-layer allocation", fontsize=10, y=1.0 + 0.3 / (1 + len(alloc.layers))
    )
    return _png(fig)
