"""Exporting an evaluated plan from the session that evaluated it, and checking the export against it.

``export_trial`` rebuilds exactly what a search's workers held — the model, the token sets and the
level store named by a ``SessionSpec`` — assembles the plan's packed modules from the store (the
very bytes that were evaluated; an entry the store lacks is recomputed by the same deterministic
method and calibration set, and reported), writes the export, and, with ``verify``, reloads it and
measures its KL to the dense model on the tokens the trial was scored on, by the evaluator's protocol.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from budgetpress.evaluators._compressed_tensors import check_expressible
from budgetpress.evaluators._data import make_token_sets
from budgetpress.evaluators._export import ExportReport, export_plan, load_compressed
from budgetpress.evaluators._export_dir import ExportFormat
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._kv_eval import KVSequences, evaluate_kv, kv_continuation_log_probs, make_kv_token_sets
from budgetpress.evaluators._loading import load_model, resolve_model
from budgetpress.evaluators._methods import Methods
from budgetpress.evaluators._metrics import kl_and_ppl, next_token_log_probs
from budgetpress.evaluators._session import SessionSpec, encoder_for, profile_source
from budgetpress.evaluators._store import LevelStore, calibration_key, model_key
from budgetpress.space import LinearSetting, Plan, Split, plan_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvaluatedPlan:
    """A plan as a search evaluated it: its KL, the split and token budget (fidelity) it was scored on."""

    plan: Plan
    kl: float | None = None
    split: Split = Split.CALIBRATION
    fidelity: int | None = None
    memory_bytes: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TrialExport:
    """An export, with the evaluated KL beside the KL measured on the reloaded export."""

    export: ExportReport
    evaluated_kl: float | None
    reloaded_kl: float | None
    memory_bytes: int
    recomputed_units: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        diff = None
        if self.evaluated_kl is not None and self.reloaded_kl is not None:
            diff = abs(self.reloaded_kl - self.evaluated_kl)
        return {
            **self.export.to_dict(),
            "memory_bytes": self.memory_bytes,
            "evaluated_kl": self.evaluated_kl,
            "reloaded_kl": self.reloaded_kl,
            "kl_abs_diff": diff,
            "recomputed_units": list(self.recomputed_units),
        }


@dataclass(frozen=True)
class DenseReference:
    """The dense model's log-probs on one split, for scoring a compressed model as ``PlanEvaluator`` does."""

    tokens: torch.Tensor
    log_probs: torch.Tensor
    kv: KVSequences | None
    kv_log_probs: torch.Tensor | None


def dense_reference(model: PreTrainedModel, tokens: torch.Tensor, kv: KVSequences | None) -> DenseReference:
    """Dense log-probs on one split's windows (and KV sequences), on the whole split as the evaluator does."""
    kv_log_probs = None
    if kv is not None:
        kv_log_probs = kv_continuation_log_probs(model, kv.tokens, prefill_len=kv.prefill_len, plan=Plan({}))
    return DenseReference(tokens, next_token_log_probs(model, tokens), kv, kv_log_probs)


def measure_kl(model: PreTrainedModel, plan: Plan, reference: DenseReference, *, max_tokens: int | None) -> float:
    """KL of ``model`` to the dense reference: ``PlanEvaluator.evaluate``'s protocol, on a model already compressed.

    The same windows (the first ones, as many as the fidelity ``max_tokens`` covers), and with KV
    sequences the same share of them under ``plan``'s KV cache, weighted by tokens.
    """
    tokens = reference.tokens
    n = len(tokens) if max_tokens is None else max(1, min(len(tokens), -(-max_tokens // tokens.shape[1])))
    log_probs = next_token_log_probs(model, tokens[:n])
    kl, _ = kl_and_ppl(reference.log_probs[:n], log_probs, tokens[:n, 1:])
    if reference.kv is None or reference.kv_log_probs is None:
        return kl
    scored = int(tokens[:n, 1:].numel())
    n_kv = max(1, round(n / len(tokens) * len(reference.kv)))
    kv = evaluate_kv(model, reference.kv.head(n_kv), plan, dense_log_probs=reference.kv_log_probs[:n_kv])
    return (kl * scored + kv.kl * kv.tokens) / (scored + kv.tokens)


def open_level_store(spec: SessionSpec, model: PreTrainedModel, calibration: torch.Tensor) -> LevelStore:
    """The session's level store, as its workers opened it."""
    return LevelStore(
        Path(spec.store_root),
        model_key=model_key(model, checkpoint_dir=resolve_model(spec.model).local_dir),
        calibration_key=calibration_key(calibration),
        methods=Methods.parse(spec.methods),
    )


def _ensure_entries(store: LevelStore, model: PreTrainedModel, plan: Plan, calibration: torch.Tensor) -> list[str]:
    """Make sure the store holds every compressed unit's entry; returns the units recomputed."""
    wanted = {k: [s] for k, s in plan.items() if isinstance(s, LinearSetting) and not s.is_dense}
    missing = sorted(k for k, (s,) in wanted.items() if not store.path(k, s).is_file())
    if missing:
        logger.warning(
            "level store %s lacks %d of the plan's variants (e.g. %s); recomputing them with %s",
            store.directory,
            len(missing),
            missing[0],
            store.methods.to_text(),
        )
    store.build(model, wanted, calibration_tokens=calibration, progress=False)
    return missing


def reload_export(report: ExportReport) -> PreTrainedModel:
    """The export loaded back for measuring: ours for native, plain transformers (float32) for compressed-tensors."""
    if report.format is ExportFormat.NATIVE:
        return load_compressed(report.directory)
    return AutoModelForCausalLM.from_pretrained(
        report.directory, dtype=torch.float32, trust_remote_code=False, use_safetensors=True, local_files_only=True
    )


def export_trial(
    spec: SessionSpec,
    evaluated: EvaluatedPlan,
    *,
    out: Path | str,
    export_format: ExportFormat | str = ExportFormat.NATIVE,
    verify: bool = True,
    root: Path | None = None,
    overwrite: bool = False,
    densify_sparse: bool = False,
) -> TrialExport:
    """Export ``evaluated.plan`` as the session ``spec`` evaluated it; with ``verify``, re-measure its KL."""
    source = resolve_model(spec.model)
    if ExportFormat(export_format) is ExportFormat.COMPRESSED_TENSORS:
        # Refuse an inexpressible plan before reading any weights.
        widths = {unit.key: unit.in_features for unit in profile_source(source).linear_units}
        check_expressible(evaluated.plan, widths, densify_sparse=densify_sparse)
    model = load_model(source)
    profile = profile_model(model, name=source.spec)
    memory = plan_bytes(profile, evaluated.plan, spec.workload)
    if evaluated.memory_bytes is not None and evaluated.memory_bytes != memory:
        raise ValueError(f"the trial recorded {evaluated.memory_bytes} bytes; the memory model now gives {memory}")
    encode = encoder_for(source)
    sets = make_token_sets(spec.tokens, encode)
    store = open_level_store(spec, model, sets.calibration)
    recomputed = _ensure_entries(store, model, evaluated.plan, sets.calibration)
    reference = None
    if verify:
        kv_sets = None if spec.kv_tokens is None else make_kv_token_sets(spec.kv_tokens, encode)
        kv = None if kv_sets is None else kv_sets.for_split(evaluated.split)
        reference = dense_reference(model, sets.for_split(evaluated.split), kv)
    store.assemble_(model, evaluated.plan)
    provenance = {**evaluated.provenance, "model": source.spec, "methods": spec.methods, "recomputed": recomputed}
    report = export_plan(
        model,
        evaluated.plan,
        out=out,
        export_format=export_format,
        source_dir=source.local_dir,
        provenance=provenance,
        root=root,
        overwrite=overwrite,
        densify_sparse=densify_sparse,
    )
    reloaded_kl = None
    if reference is not None:
        reloaded_kl = measure_kl(reload_export(report), evaluated.plan, reference, max_tokens=evaluated.fidelity)
        _log_comparison(evaluated.kl, reloaded_kl)
    return TrialExport(
        export=report,
        evaluated_kl=evaluated.kl,
        reloaded_kl=reloaded_kl,
        memory_bytes=memory,
        recomputed_units=tuple(recomputed),
    )


def _log_comparison(evaluated: float | None, reloaded: float) -> None:
    if evaluated is None or not math.isfinite(evaluated):
        logger.info("reloaded export: KL %.6g (no evaluated KL to compare)", reloaded)
        return
    logger.info("reloaded export: KL %.9g, evaluated %.9g (difference %.3g)", reloaded, evaluated, reloaded - evaluated)
