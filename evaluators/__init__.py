"""Model loading and inspection, token sets, compression methods and plan evaluation."""

from budgetpress.evaluators._assembly import apply_plan_
from budgetpress.evaluators._builtin import BUILTIN_DIR, PRESETS, Recipe, read_manifest, train_builtin
from budgetpress.evaluators._calibration import InputStats, InputStatsAccumulator, collect_input_stats
from budgetpress.evaluators._data import TokenSets, TokenSpec, byte_encoder, check_text_files, make_token_sets
from budgetpress.evaluators._evaluator import PlanEvaluator
from budgetpress.evaluators._export import ExportReport, export_plan, load_compressed
from budgetpress.evaluators._export_dir import ExportError, ExportFormat, verify_export
from budgetpress.evaluators._export_trial import EvaluatedPlan, TrialExport, export_trial, measure_kl
from budgetpress.evaluators._gptq import gptq_quantize
from budgetpress.evaluators._inspect import profile_model
from budgetpress.evaluators._kv_eval import (
    KVEvaluation,
    KVSequences,
    KVTokenSets,
    KVTokenSpec,
    continuation_targets,
    evaluate_kv,
    kv_continuation_log_probs,
    make_kv_token_sets,
    recall_accuracy,
)
from budgetpress.evaluators._loading import (
    BUILTIN_NAME,
    ModelLoadError,
    ModelSource,
    load_model,
    resolve_model,
)
from budgetpress.evaluators._low_rank import LowRankWeight, svd_llm_low_rank, svd_low_rank
from budgetpress.evaluators._methods import (
    SEARCH_METHODS,
    BitsMethod,
    Methods,
    RankMethod,
    SparsityMethod,
    Variant,
    compress_weight,
    pack_variant,
    variant_weight,
)
from budgetpress.evaluators._metrics import kl_and_ppl, next_token_log_probs
from budgetpress.evaluators._rtn import QuantizedWeight, rtn_quantize
from budgetpress.evaluators._session import (
    EvaluationSession,
    SessionSpec,
    build_store,
    default_store_root,
    encoder_for,
    open_session,
    profile_source,
)
from budgetpress.evaluators._sparsity import PrunedWeight, prune_magnitude, prune_sparsegpt, prune_wanda
from budgetpress.evaluators._store import (
    LevelStore,
    MissingEntryError,
    StoreReport,
    calibration_key,
    model_key,
)

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_NAME",
    "PRESETS",
    "SEARCH_METHODS",
    "BitsMethod",
    "EvaluatedPlan",
    "EvaluationSession",
    "ExportError",
    "ExportFormat",
    "ExportReport",
    "InputStats",
    "InputStatsAccumulator",
    "KVEvaluation",
    "KVSequences",
    "KVTokenSets",
    "KVTokenSpec",
    "LevelStore",
    "LowRankWeight",
    "Methods",
    "MissingEntryError",
    "ModelLoadError",
    "ModelSource",
    "PlanEvaluator",
    "PrunedWeight",
    "QuantizedWeight",
    "RankMethod",
    "Recipe",
    "SessionSpec",
    "SparsityMethod",
    "StoreReport",
    "TokenSets",
    "TokenSpec",
    "TrialExport",
    "Variant",
    "apply_plan_",
    "build_store",
    "byte_encoder",
    "calibration_key",
    "check_text_files",
    "collect_input_stats",
    "compress_weight",
    "continuation_targets",
    "default_store_root",
    "encoder_for",
    "evaluate_kv",
    "export_plan",
    "export_trial",
    "gptq_quantize",
    "kl_and_ppl",
    "kv_continuation_log_probs",
    "load_compressed",
    "load_model",
    "make_kv_token_sets",
    "make_token_sets",
    "measure_kl",
    "model_key",
    "next_token_log_probs",
    "open_session",
    "pack_variant",
    "profile_model",
    "profile_source",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "read_manifest",
    "recall_accuracy",
    "resolve_model",
    "rtn_quantize",
    "svd_llm_low_rank",
    "svd_low_rank",
    "train_builtin",
    "variant_weight",
    "verify_export",
]
