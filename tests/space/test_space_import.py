from __future__ import annotations

import os
import subprocess
import sys

import budgetpress.space as space


def test_import_pulls_in_no_heavy_dependencies() -> None:
    code = (
        "import sys, budgetpress.space\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'triton') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_public_names_are_exported() -> None:
    assert sorted(space.__all__) == sorted(set(space.__all__))
    for name in space.__all__:
        assert hasattr(space, name), name
