"""Shared test setup.

Without a GPU, Triton kernels run under Triton's numpy interpreter. It must be switched
on before triton is first imported, so this happens here, before any test module loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def official_fixtures_dir() -> Path:
    """Folder of the official reference outputs (see ../shared/fixtures/official/README.md)."""
    return Path(os.environ.get("RECTOK_OFFICIAL_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official"))


@pytest.fixture
def official_fixtures() -> Path:
    path = official_fixtures_dir()
    if not (path / "meta.json").is_file():
        pytest.skip(f"official fixtures not found at {path} (set RECTOK_OFFICIAL_FIXTURES)")
    return path


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
