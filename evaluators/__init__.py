"""Model loading and inspection, token sets, compression methods and plan evaluation."""

from budgetpress.evaluators._assembly import apply_plan_
from budgetpress.evaluators._builtin import BUILTIN_DIR, PRESETS, Recipe, read_manifest, train_builtin
from budgetpress.evaluators._calibration import InputStats, InputStatsAccumulator, collect_input_stats
from budgetpress.evaluators._data import TokenSets, TokenSpec, byte_encoder, check_text_files, make_token_sets
from budgetpress.evaluators._evaluator import WEIGHT_METHODS, PlanEvaluator, kl_and_ppl, next_token_log_probs
from budgetpress.evaluators._gptq import gptq_quantize
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._loading import (
    BUILTIN_NAME,
    ModelLoadError,
    ModelSource,
    load_model,
    resolve_model,
)
from budgetpress.evaluators._low_rank import LowRankWeight, svd_llm_low_rank, svd_low_rank
from budgetpress.evaluators._methods import (
    BitsMethod,
    Methods,
    RankMethod,
    SparsityMethod,
    Variant,
    compress_weight,
    pack_variant,
    variant_weight,
)
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize
from budgetpress.evaluators._session import EvaluationSession, encoder_for, open_session, profile_source
from budgetpress.evaluators._sparsity import PrunedWeight, prune_magnitude, prune_sparsegpt, prune_wanda

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_NAME",
    "PRESETS",
    "WEIGHT_METHODS",
    "BitsMethod",
    "EvaluationSession",
    "InputStats",
    "InputStatsAccumulator",
    "LowRankWeight",
    "Methods",
    "ModelLoadError",
    "ModelSource",
    "PlanEvaluator",
    "PrunedWeight",
    "QuantizedWeight",
    "RankMethod",
    "Recipe",
    "SparsityMethod",
    "TokenSets",
    "TokenSpec",
    "Variant",
    "apply_plan_",
    "byte_encoder",
    "check_text_files",
    "collect_input_stats",
    "compress_weight",
    "encoder_for",
    "gptq_quantize",
    "kl_and_ppl",
    "load_model",
    "make_token_sets",
    "next_token_log_probs",
    "open_session",
    "pack_variant",
    "profile_model",
    "profile_source",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "read_manifest",
    "resolve_model",
    "rtn_quantize",
    "svd_llm_low_rank",
    "svd_low_rank",
    "train_builtin",
    "variant_weight",
]
