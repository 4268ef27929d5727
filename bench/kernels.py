"""Kernels benchmark: correctness, held bytes and speed of every packed op, side by side in one run.

    python bench/kernels.py [--json] [--quick]

For each op × format × bit-width it reports:

* ``max_rel_err``: the Triton kernel against its plain-torch reference (max |a-b| / max |b|), on a
  small odd shape. Without a GPU the kernel runs in Triton's interpreter (numpy speed), which is why
  correctness uses a small shape and timing a larger one.
* ``held_bytes`` vs ``model_bytes``: what the packed module holds and what ``space`` counts.
* timings measured in this run: the reference op, the Triton op (GPU only: interpreted timings mean
  nothing) and the dense matmul at the same shape; ``speedup_vs_dense`` is dense time over the time
  of the op that the backend switch picks on this machine.
* ``bw_fraction`` (GPU decode paths): bytes the op must read / its time / the device's peak HBM
  bandwidth.

With ``--json`` the last line is one JSON object: ``{"device", "ops": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the import of any kernel module (they define @triton.jit functions).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# This file's name would shadow the `kernels` package that transformers probes for, so its folder
# leaves the import path; the case definitions live in _support/.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE / "_support"))

from kernel_cases import CASE_BUILDERS, Case  # noqa: E402

# Nominal peak HBM bandwidth (bytes/s) by device name, from the vendors' data sheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


@dataclass(frozen=True)
class Timing:
    reference_ms: float
    triton_ms: float | None
    dense_ms: float


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores), no GPU: Triton checked in its interpreter, not timed"


def _peak_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BANDWIDTH.items() if key in name), None)


def time_ms(fn: Callable[[], object], *, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after a warm-up."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.float().abs().max()) or 1.0
    return float((actual.float() - expected.float()).abs().max()) / scale


def _measure(case: Case, *, repeats: int) -> Timing:
    with torch.no_grad():
        reference = time_ms(case.timed_reference, repeats=repeats)
        dense = time_ms(case.timed_dense, repeats=repeats)
        triton_ms = time_ms(case.timed_triton, repeats=repeats) if torch.cuda.is_available() else None
    return Timing(reference_ms=reference, triton_ms=triton_ms, dense_ms=dense)


def run_case(case: Case, *, repeats: int) -> dict[str, object]:
    with torch.no_grad():
        error = max_rel_err(case.check_triton(), case.check_reference())
    timing = _measure(case, repeats=repeats)
    chosen_ms = timing.triton_ms if timing.triton_ms is not None else timing.reference_ms
    peak = _peak_bandwidth()
    bw = None
    if case.decode and peak is not None and timing.triton_ms is not None:
        bw = case.moved_bytes / (timing.triton_ms / 1e3) / peak
    return {
        "op": case.op,
        "format": case.format,
        "bits": case.bits,
        "shape": list(case.shape),
        "max_rel_err": error,
        "held_bytes": case.held_bytes,
        "model_bytes": case.model_bytes,
        "speedup_vs_dense": timing.dense_ms / chosen_ms,
        "bw_fraction": bw,
        "reference_ms": timing.reference_ms,
        "triton_ms": timing.triton_ms,
        "dense_ms": timing.dense_ms,
        "backend": "triton" if timing.triton_ms is not None else "reference",
    }


def _row(entry: dict[str, object]) -> str:
    triton_ms = entry["triton_ms"]
    bw = entry["bw_fraction"]
    return (
        f"{entry['op']:<18} {entry['format']:<20} {entry['bits']!s:>4} {'x'.join(map(str, entry['shape'])):>16} "  # type: ignore[arg-type]
        f"{entry['max_rel_err']:>9.2e} {entry['held_bytes']:>11} {entry['model_bytes']:>11} "
        f"{entry['reference_ms']:>9.3f} {'-' if triton_ms is None else f'{triton_ms:.3f}':>9} "
        f"{entry['dense_ms']:>9.3f} {entry['speedup_vs_dense']:>7.2f}x {'-' if bw is None else f'{bw:.0%}':>6}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller timing shapes")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 3 if args.quick else 10
    entries = []
    print(_header(), file=sys.stderr if args.json else sys.stdout)
    for build in CASE_BUILDERS:
        for case in build(device=device, quick=args.quick):
            entry = run_case(case, repeats=repeats)
            entries.append(entry)
            print(_row(entry), file=sys.stderr if args.json else sys.stdout, flush=True)
    mismatched = [e for e in entries if e["held_bytes"] != e["model_bytes"]]
    if mismatched:
        print(f"{len(mismatched)} op(s) hold other bytes than the memory model counts", file=sys.stderr)
    if args.json:
        print(json.dumps({"device": _device_name(), "ops": entries}))
    return 1 if mismatched else 0


def _header() -> str:
    return (
        f"{'op':<18} {'format':<20} {'bits':>4} {'shape':>16} {'max_rel':>9} {'held_B':>11} {'model_B':>11} "
        f"{'ref_ms':>9} {'triton_ms':>9} {'dense_ms':>9} {'vs dense':>8} {'bw':>6}"
    )


if __name__ == "__main__":
    sys.exit(main())
