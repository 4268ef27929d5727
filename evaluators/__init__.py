"""Model loading and inspection, token sets, compression methods and plan evaluation."""

from budgetpress.evaluators._assembly import apply_plan_
from budgetpress.evaluators._builtin import BUILTIN_DIR, PRESETS, Recipe, read_manifest, train_builtin
from budgetpress.evaluators._data import TokenSets, TokenSpec, byte_encoder, check_text_files, make_token_sets
from budgetpress.evaluators._evaluator import WEIGHT_METHODS, PlanEvaluator, kl_and_ppl, next_token_log_probs
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._loading import (
    BUILTIN_NAME,
    ModelLoadError,
    ModelSource,
    load_model,
    resolve_model,
)
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize
from budgetpress.evaluators._session import EvaluationSession, encoder_for, open_session, profile_source

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_NAME",
    "PRESETS",
    "WEIGHT_METHODS",
    "EvaluationSession",
    "ModelLoadError",
    "ModelSource",
    "PlanEvaluator",
    "QuantizedWeight",
    "Recipe",
    "TokenSets",
    "TokenSpec",
    "apply_plan_",
    "byte_encoder",
    "check_text_files",
    "encoder_for",
    "kl_and_ppl",
    "load_model",
    "make_token_sets",
    "next_token_log_probs",
    "open_session",
    "profile_model",
    "profile_source",
    "read_manifest",
    "resolve_model",
    "rtn_quantize",
    "train_builtin",
]
