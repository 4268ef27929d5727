"""Everything a worker needs to evaluate plans of one model, built from plain, picklable specs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from budgetpress.evaluators._data import Encoder, TokenSpec, byte_encoder, make_token_sets
from budgetpress.evaluators._evaluator import PlanEvaluator
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._loading import BUILTIN_NAME, ModelSource, load_model
from budgetpress.space import ModelProfile, Split, Workload


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


def open_session(
    source: ModelSource, *, tokens: TokenSpec, workload: Workload, method: str = "rtn"
) -> EvaluationSession:
    """Load the model and token sets and compute the dense references once."""
    model = load_model(source)
    profile = profile_model(model, name=source.spec)
    sets = make_token_sets(tokens, encoder_for(source))
    evaluator = PlanEvaluator(
        model=model,
        profile=profile,
        workload=workload,
        method=method,
        token_sets={Split.CALIBRATION: sets.calibration, Split.EVALUATION: sets.evaluation},
    )
    return EvaluationSession(source=source, profile=profile, evaluator=evaluator)
