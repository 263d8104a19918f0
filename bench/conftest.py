"""pytest options for bench/test_*.py: benchmarks run once each (a smoke test) unless
`--benchmark-enable` is given; without pytest-benchmark installed, the `benchmark` fixture calls
the function once, so these files never fail for want of the plugin."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark builds its session in a trylast pytest_configure, after this one.
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable"):
        config.option.benchmark_disable = True


if not __import__("importlib").util.find_spec("pytest_benchmark"):

    @pytest.fixture
    def benchmark():
        class RunOnce:
            group = None

            def __call__(self, fn, *args, **kwargs):
                return fn(*args, **kwargs)

        return RunOnce()
