"""Packed formats and the ops on them; plain-torch references (Triton kernels come beside them)."""

from budgetpress.kernels._backend import Backend, backend_for
from budgetpress.kernels._kv_attention import (
    PLAN_KV_ATTENTION,
    quantized_decode_attention,
    quantized_decode_attention_reference,
    quantized_decode_attention_triton,
    use_plan_kv_attention_,
)
from budgetpress.kernels._kv_cache import PlanKVCache, PlanKVLayer
from budgetpress.kernels._kv_quant import (
    KV_QUANT_BITS,
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    pack_kv_codes,
    quantize_keys,
    quantize_values,
    unpack_kv_codes,
)
from budgetpress.kernels._low_rank import LowRankLinear, low_rank_linear_reference, low_rank_linear_triton
from budgetpress.kernels._packing import PACKABLE_BITS, pack_rows, unpack_rows, words_per_row
from budgetpress.kernels._quant_linear import QuantLinear, dequantize_packed, quant_linear_reference
from budgetpress.kernels._serialize import module_from_tensors, module_tensors
from budgetpress.kernels._sparse import (
    SparseLinear,
    SparseLinearOp,
    check_sparse_mask,
    dequantize_sparse,
    pack_bitmask,
    sparse_linear_reference,
    unpack_bitmask,
)
from budgetpress.kernels._triton_quant import quant_gemv_triton, quant_linear_triton, quant_matmul_triton

__all__ = [
    "KV_QUANT_BITS",
    "PACKABLE_BITS",
    "PLAN_KV_ATTENTION",
    "Backend",
    "LowRankLinear",
    "PlanKVCache",
    "PlanKVLayer",
    "QuantLinear",
    "QuantizedKV",
    "SparseLinear",
    "SparseLinearOp",
    "backend_for",
    "check_sparse_mask",
    "dequantize_keys",
    "dequantize_packed",
    "dequantize_sparse",
    "dequantize_values",
    "low_rank_linear_reference",
    "low_rank_linear_triton",
    "module_from_tensors",
    "module_tensors",
    "pack_bitmask",
    "pack_kv_codes",
    "pack_rows",
    "quant_gemv_triton",
    "quant_linear_reference",
    "quant_linear_triton",
    "quant_matmul_triton",
    "quantize_keys",
    "quantize_values",
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
    "quantized_decode_attention_triton",
    "sparse_linear_reference",
    "unpack_bitmask",
    "unpack_kv_codes",
    "unpack_rows",
    "use_plan_kv_attention_",
    "words_per_row",
]
