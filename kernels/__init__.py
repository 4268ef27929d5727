"""Packed formats and the ops on them; plain-torch references (Triton kernels come beside them)."""

from budgetpress.kernels._packing import PACKABLE_BITS, pack_rows, unpack_rows, words_per_row
from budgetpress.kernels._quant_linear import QuantLinear, dequantize_packed, quant_linear_reference

__all__ = [
    "PACKABLE_BITS",
    "QuantLinear",
    "dequantize_packed",
    "pack_rows",
    "quant_linear_reference",
    "unpack_rows",
    "words_per_row",
]
