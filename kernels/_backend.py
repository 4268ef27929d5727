"""Which implementation runs an op: the Triton kernel on a GPU, the plain-torch reference elsewhere.

``BUDGETPRESS_KERNELS`` overrides the choice: ``auto`` (default), ``reference`` or ``triton``.
``triton`` on a CPU tensor needs ``TRITON_INTERPRET=1`` (set before any kernel module is imported),
which is how the tests compare kernels with their references on a machine without a GPU.
Triton is imported lazily, so ``import budgetpress.kernels`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from enum import StrEnum

import torch

ENV_VAR = "BUDGETPRESS_KERNELS"


class Backend(StrEnum):
    REFERENCE = "reference"
    TRITON = "triton"


@functools.cache
def triton_available() -> bool:
    """Triton is installed (it may still need a GPU or the interpreter to run)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton kernels run in the numpy interpreter (no GPU needed, numpy speed)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value not in ("auto", Backend.REFERENCE, Backend.TRITON):
        raise ValueError(f"{ENV_VAR} must be 'auto', 'reference' or 'triton'; got {value!r}")
    return value


def backend_for(device: torch.device) -> Backend:
    """The backend that runs ops on tensors on ``device``, honouring ``BUDGETPRESS_KERNELS``."""
    requested = _requested()
    if requested == Backend.REFERENCE:
        return Backend.REFERENCE
    runnable = triton_available() and (device.type == "cuda" or interpreting())
    if requested == Backend.TRITON:
        if not runnable:
            raise RuntimeError(
                f"{ENV_VAR}=triton needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); "
                f"got a {device.type} tensor with triton {'installed' if triton_available() else 'missing'}"
            )
        return Backend.TRITON
    return Backend.TRITON if runnable and device.type == "cuda" else Backend.REFERENCE
