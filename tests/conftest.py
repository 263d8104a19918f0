"""Shared test setup.

Without a GPU, Triton kernels run under Triton's numpy interpreter. It must be switched
on before triton is first imported, so this happens here, before any test module loads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

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


@functools.cache
def load_script(name: str) -> ModuleType:
    """A top-level script (train.py, sample.py) imported as a module, once per test session, so that
    tests call its main() in process."""
    spec = importlib.util.spec_from_file_location(f"rectok_script_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_script():
    """train.py as a module, run with one intra-op thread (tiny models on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_script("train.py")
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_16(tmp_path_factory) -> Path:
    """The demo dataset with 16 training images (8 classes x 2; 2 optimizer steps per epoch at
    global batch 8) and 8 held-out ones, built once per test session."""
    from rectok.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(
        tmp_path_factory.mktemp("demo16"), train_per_class=2, val_per_class=1, min_size=64, max_size=80
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (weights must load offline)."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def official_fixtures() -> Path:
    path = official_fixtures_dir()
    if not (path / "meta.json").is_file():
        pytest.skip(f"official fixtures not found at {path} (set RECTOK_OFFICIAL_FIXTURES)")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """On a GPU machine (interpreter off), CPU-tensor Triton tests skip instead of failing.

    Only there: on a CPU-only machine the interpreter is always on (above), so such an
    error is a real failure and stays one.

    Their GPU counterparts are the tests marked `cuda`. To run them too on such a machine:
    TRITON_INTERPRET=1 python -m pytest -m "not cuda".
    """
    outcome = yield
    from rectok.kernels.backend import TritonInterpreterRequired

    error = outcome.excinfo[1] if outcome.excinfo else None
    if HAS_CUDA and isinstance(error, TritonInterpreterRequired):
        outcome.force_exception(
            pytest.skip.Exception(f"needs Triton's interpreter: {error}", _use_item_location=True)
        )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
