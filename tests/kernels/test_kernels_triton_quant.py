"""The Triton quantized linear kernels against the plain-torch reference, and the backend switch.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before collection), so shapes are small and odd: row lengths that are not
multiples of the group size or of the K block, and output counts that are not multiples of the N
block.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from budgetpress.evaluators import rtn_quantize
from budgetpress.kernels import (
    QuantLinear,
    pack_rows,
    quant_gemv_triton,
    quant_linear_reference,
    quant_linear_triton,
    quant_matmul_triton,
)
from budgetpress.kernels._backend import ENV_VAR, Backend, backend_for

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, None]
SHAPES = [(37, 100), (24, 160)]  # (out, in): 100 is no multiple of 32 or 64; 160 = 2.5 groups of 64
# Kernels run on the GPU where there is one, else in the interpreter on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module(out_features: int, in_features: int, *, bits: int, group_size: int | None, bias: bool) -> QuantLinear:
    generator = torch.Generator().manual_seed(bits * 7919 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    q = rtn_quantize(weight, bits=bits, group_size=group_size)
    b = torch.randn(out_features, generator=generator) if bias else None
    return QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=bits, group_size=group_size, bias=b).to(DEVICE)


def _call(op: object, module: QuantLinear, x: torch.Tensor, **extra: object) -> torch.Tensor:
    assert callable(op)
    result = op(
        x,
        module.qweight,
        module.scales,
        module.zeros,
        module.bias,
        bits=module.bits,
        in_features=module.in_features,
        group_size=module.group_size,
        **extra,
    )
    assert isinstance(result, torch.Tensor)
    return result


def _x(rows: int, in_features: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _assert_close_to(actual: torch.Tensor, expected: torch.Tensor, *, rel: float) -> None:
    """Elementwise within ``rel`` of the output's magnitude (sums of ~100 terms cancel)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_kernels_match_reference(
    bits: int, group_size: int | None, out_features: int, in_features: int, rows: int
) -> None:
    module = _module(out_features, in_features, bits=bits, group_size=group_size, bias=rows != 1)
    x = _x(rows, in_features, seed=rows)
    expected = _call(quant_linear_reference, module, x)
    path = quant_gemv_triton if rows <= 16 else quant_matmul_triton
    actual = _call(path, module, x)
    _assert_close_to(actual, expected, rel=1e-4)
    # The dispatcher runs the same kernel: bit-identical output.
    assert torch.equal(_call(quant_linear_triton, module, x), actual)


@pytest.mark.parametrize("bits", BITS)
def test_unit_scales_reproduce_every_code_exactly(bits: int) -> None:
    """With scale 1 and zero 0, one-hot rows of x read single codes back: the unpacking is exact.

    93 codes of 3 bits straddle word boundaries at codes 10, 21, 32, ...; both paths must read them.
    """
    out_features, in_features = 19, 93
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=torch.Generator().manual_seed(bits))
    codes = codes.to(torch.uint8)
    ones = torch.ones(out_features, 1, dtype=torch.float16)
    module = QuantLinear(
        in_features=in_features,
        out_features=out_features,
        bits=bits,
        group_size=None,
        qweight=pack_rows(codes, bits),
        scales=ones,
        zeros=torch.zeros(out_features, 1, dtype=torch.uint8),
    ).to(DEVICE)
    eye = torch.eye(in_features, device=DEVICE)
    expected = codes.T.float().to(DEVICE)
    picked = [0, 10, 11, 21, 31, 32, 92]
    assert torch.equal(_call(quant_gemv_triton, module, eye[picked]), expected[picked])
    assert torch.equal(_call(quant_matmul_triton, module, eye), expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("group_size", "gemv_blocks", "matmul_blocks"),
    [
        (32, (16, 64), (16, 16, 64)),  # K tiles of two whole groups: a scale per (row, group)
        (32, (8, 16), (16, 32, 16)),  # K tiles inside a group; a 2-bit tile is a single word
        (32, (32, 128), (32, 16, 128)),  # one K tile longer than the whole row
        (48, (16, 64), (16, 16, 32)),  # groups end inside tiles: scales gathered per column
        (48, (16, 16), (16, 16, 16)),  # 16 divides 48: each tile inside one group again
    ],
)
def test_block_shapes_cover_every_scale_path(
    bits: int, group_size: int, gemv_blocks: tuple[int, int], matmul_blocks: tuple[int, int, int]
) -> None:
    module = _module(37, 100, bits=bits, group_size=group_size, bias=True)
    x = _x(19, 100, seed=5)
    expected = _call(quant_linear_reference, module, x)
    _assert_close_to(_call(quant_matmul_triton, module, x, blocks=matmul_blocks), expected, rel=1e-4)
    _assert_close_to(_call(quant_gemv_triton, module, x[:5], blocks=gemv_blocks), expected[:5], rel=1e-4)
    _assert_close_to(_call(quant_gemv_triton, module, x[:1], blocks=gemv_blocks), expected[:1], rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 18])
def test_half_precision_inputs_give_half_precision_outputs(dtype: torch.dtype, rows: int) -> None:
    module = _module(37, 100, bits=4, group_size=32, bias=True)
    x = _x(rows, 100, seed=3, dtype=dtype)
    actual = _call(quant_linear_triton, module, x)
    assert actual.dtype == dtype
    # Both round the weight to x's dtype; they differ in summation order and the final rounding.
    _assert_close_to(actual, _call(quant_linear_reference, module, x), rel=2e-2)


@pytest.mark.parametrize("leading", [(2, 3), (2, 11)])
def test_leading_dimensions_are_kept(leading: tuple[int, ...]) -> None:
    module = _module(24, 160, bits=3, group_size=64, bias=False)
    x = torch.randn(*leading, 160, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    actual = _call(quant_linear_triton, module, x)
    assert actual.shape == (*leading, 24)
    _assert_close_to(actual, _call(quant_linear_reference, module, x), rel=1e-4)


def test_matmul_path_takes_a_single_row_and_empty_input_gives_empty_output() -> None:
    module = _module(24, 160, bits=8, group_size=None, bias=True)
    x = _x(1, 160)
    _assert_close_to(_call(quant_matmul_triton, module, x), _call(quant_linear_reference, module, x), rel=1e-4)
    empty = torch.zeros(0, 160, device=DEVICE)
    assert _call(quant_linear_triton, module, empty).shape == (0, 24)


def test_bad_arguments_are_rejected() -> None:
    module = _module(24, 160, bits=4, group_size=64, bias=False)
    with pytest.raises(ValueError, match="at most 16 rows"):
        _call(quant_gemv_triton, module, _x(17, 160))
    with pytest.raises(ValueError, match="160"):
        _call(quant_linear_triton, module, _x(2, 150))
    with pytest.raises(ValueError, match="scales must have shape"):
        quant_linear_triton(
            _x(2, 160), module.qweight, module.scales[:, :2], module.zeros, None, bits=4, in_features=160, group_size=64
        )
    with pytest.raises(ValueError, match="power of two"):
        _call(quant_gemv_triton, module, _x(2, 160), blocks=(16, 24))


@pytest.mark.parametrize("rows", [3, 20])
def test_quant_linear_forward_runs_triton_when_asked(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    monkeypatch.setenv(ENV_VAR, "triton")
    module = _module(37, 100, bits=3, group_size=32, bias=True)
    x = _x(rows, 100, seed=rows)
    actual = module(x)
    assert torch.equal(actual, _call(quant_linear_triton, module, x))
    _assert_close_to(actual, _call(quant_linear_reference, module, x), rel=1e-4)


@pytest.mark.parametrize("setting", [None, "auto", "reference"])
def test_cpu_tensors_use_the_reference_by_default(monkeypatch: pytest.MonkeyPatch, setting: str | None) -> None:
    if setting is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, setting)
    assert backend_for(torch.device("cpu")) is Backend.REFERENCE

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the Triton path ran for a CPU tensor")

    monkeypatch.setattr("budgetpress.kernels._triton_quant.quant_linear_triton", refuse)
    module = _module(24, 160, bits=4, group_size=64, bias=True).cpu()
    x = _x(3, 160).cpu()
    assert torch.equal(module(x), _call(quant_linear_reference, module, x))


def test_importing_kernels_loads_no_triton() -> None:
    code = "import sys, budgetpress.kernels\nprint('triton' in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
