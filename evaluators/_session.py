"""Everything a worker needs to evaluate plans of one model, built from plain, picklable specs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from budgetpress.evaluators._data import Encoder, TokenSets, TokenSpec, byte_encoder, make_token_sets
from budgetpress.evaluators._evaluator import PlanEvaluator
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._kv_eval import KVTokenSpec, make_kv_token_sets
from budgetpress.evaluators._loading import BUILTIN_NAME, ModelSource, load_model, resolve_model
from budgetpress.evaluators._methods import SEARCH_METHODS, Methods
from budgetpress.evaluators._store import LevelStore, StoreReport, calibration_key, model_key
from budgetpress.space import ModelProfile, SearchSpace, Split, Workload

STORE_ENV_VAR = "BUDGETPRESS_STORE"


def default_store_root() -> Path:
    """Where level stores live unless told otherwise: ``$BUDGETPRESS_STORE``, else the user's cache folder."""
    configured = os.environ.get(STORE_ENV_VAR)
    return Path(configured) if configured else Path.home() / ".cache" / "budgetpress" / "levels"


@dataclass(frozen=True, kw_only=True)
class SessionSpec:
    """What a worker loads: the model, its token sets, the level store and (optionally) KV sequences."""

    model: str
    workload: Workload
    tokens: TokenSpec = field(default_factory=TokenSpec)
    store_root: str = field(default_factory=lambda: str(default_store_root()))
    methods: str = SEARCH_METHODS
    kv_tokens: KVTokenSpec | None = None


@dataclass
class EvaluationSession:
    source: ModelSource
    profile: ModelProfile
    evaluator: PlanEvaluator


def encoder_for(source: ModelSource) -> Encoder:
    """Bytes for the built-in model (its saved tokenizer maps ids to bytes too); the checkpoint's own
    tokenizer otherwise."""
    if source.spec == BUILTIN_NAME:
        return byte_encoder
    tokenizer = AutoTokenizer.from_pretrained(
        source.location, trust_remote_code=False, local_files_only=source.local_dir is not None
    )

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


def profile_source(source: ModelSource) -> ModelProfile:
    """The profile from the config alone, on the meta device: no weights are read."""
    config = AutoConfig.from_pretrained(
        source.location, trust_remote_code=False, local_files_only=source.local_dir is not None
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return profile_model(model, name=source.spec)


def _open_store(spec: SessionSpec, source: ModelSource, model: PreTrainedModel, sets: TokenSets) -> LevelStore:
    return LevelStore(
        Path(spec.store_root),
        model_key=model_key(model, checkpoint_dir=source.local_dir),
        calibration_key=calibration_key(sets.calibration),
        methods=Methods.parse(spec.methods),
    )


def build_store(spec: SessionSpec, space: SearchSpace, *, progress: bool = True) -> StoreReport:
    """Make every unit's variant at every linear choice of ``space`` that the store lacks (once per model,
    methods and calibration set; later searches reuse them)."""
    source = resolve_model(spec.model)
    model = load_model(source)
    sets = make_token_sets(spec.tokens, encoder_for(source))
    store = _open_store(spec, source, model, sets)
    wanted = {unit.key: space.linear_choices for unit in space.profile.linear_units}
    return store.build(model, wanted, calibration_tokens=sets.calibration, progress=progress)


def evaluation_device() -> torch.device:
    """The GPU where this process sees one (a Ray worker that was given one), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def open_session(spec: SessionSpec) -> EvaluationSession:
    """Load the model, token sets and level store, and compute the dense references once.

    On a GPU plans run on the packed Triton kernels; on the CPU each variant runs as the weight its
    packed module dequantizes to. The model stays float32 on both: the level store is keyed by the
    dtype it was built from (``build_store``, on the CPU).
    """
    source = resolve_model(spec.model)
    model = load_model(source)
    model.to(evaluation_device())  # type: ignore[arg-type]  # transformers wraps `to` with a mistyped decorator
    profile = profile_model(model, name=source.spec)
    encode = encoder_for(source)
    sets = make_token_sets(spec.tokens, encode)
    evaluator = PlanEvaluator(
        model=model,
        profile=profile,
        workload=spec.workload,
        store=_open_store(spec, source, model, sets),
        token_sets={Split.CALIBRATION: sets.calibration, Split.EVALUATION: sets.evaluation},
        kv_sets=None if spec.kv_tokens is None else make_kv_token_sets(spec.kv_tokens, encode),
    )
    return EvaluationSession(source=source, profile=profile, evaluator=evaluator)
