"""pytest options for bench/test_*.py: benchmarks run once each (a smoke test) unless
`--benchmark-enable` is given; without pytest-benchmark (not installed, or `-p no:benchmark`), a
stand-in `benchmark` fixture calls the function once, so these files never fail for want of it."""

from __future__ import annotations

import pytest


class _RunOnce:
    """What the tests use of pytest-benchmark's fixture: call it, set its group."""

    group: str | None = None

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class _StandIn:
    @pytest.fixture
    def benchmark(self) -> _RunOnce:
        return _RunOnce()


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("benchmark"):
        # pytest-benchmark builds its session in a trylast pytest_configure, after this one.
        if not config.getoption("benchmark_enable"):
            config.option.benchmark_disable = True
    else:
        config.pluginmanager.register(_StandIn(), "benchmark-stand-in")
