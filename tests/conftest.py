"""Fixtures shared across packages: a micro built-in model trained once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Without a GPU, Triton kernels run in its interpreter; the variable must be set before any module
# that defines a kernel is imported, so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
POSTGRES_URL = os.environ.get("BUDGETPRESS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session", autouse=True)
def level_store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One level store for the whole run, never the user's cache; subprocesses inherit it."""
    root = tmp_path_factory.mktemp("levels")
    os.environ["BUDGETPRESS_STORE"] = str(root)
    return root


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro preset of the built-in recipe, trained here in seconds: a real byte-level Llama."""
    from budgetpress.evaluators import train_builtin

    out = tmp_path_factory.mktemp("micro")
    train_builtin(preset="micro", out_dir=out)
    return out
