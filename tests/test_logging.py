"""What a training run shows and sends while it runs: Weights & Biases (optional) and progress.

Proves, with a fake `wandb` module and tiny real runs of train.py: --wandb project/name starts a
W&B run with that project and name, the run folder and the resolved config, no `mode=` of its own
(WANDB_MODE decides, and the run says which mode it got), logs exactly the steps and values of
metrics.jsonl and finishes it; --resume auto continues the same W&B run and --resume never starts
a new one; without wandb installed, --wandb fails with one line before the run folder is made,
and a run without --wandb never needs it. --progress lines (and auto off a terminal) prints one
plain line per metrics record and no carriage return; --progress bar (and auto on a terminal)
draws the tqdm bar.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from rectok.training import wandb_logger


class FakeWandb(ModuleType):
    """Records wandb.init's arguments, wandb.log's calls and wandb.finish; the mode a real W&B
    would take from the environment is given by `mode`."""

    def __init__(self, mode: str = "online") -> None:
        super().__init__("wandb")
        self.mode = mode
        self.inits: list[dict] = []
        self.logs: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return SimpleNamespace(id=kwargs["id"], settings=SimpleNamespace(mode=self.mode))

    def log(self, data: dict, step: int | None = None) -> None:
        self.logs.append((step, dict(data)))

    def finish(self) -> None:
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb(mode="offline")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "8", "--micro_batch", "4",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false",
        "--data.eval_images", "4", "--data.num_workers", "0", "--export", "false", *extra,
    ]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _as_logged(records: list[dict]) -> list[tuple[int, dict]]:
    """metrics.jsonl rows as the wandb.log calls they should have made (W&B keeps its own time)."""
    return [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in records]


def test_wandb_gets_every_record_and_a_resume_continues_its_run(
    train_script, demo_16, tmp_path, fake_wandb, capsys
):
    run_dir = tmp_path / "run"
    train_script.main(_args(demo_16, run_dir, "--wandb", "proj/name", "--max_steps", "2"))
    (init,) = fake_wandb.inits
    assert init["project"] == "proj" and init["name"] == "name" and init["dir"] == str(run_dir)
    assert init["config"] == json.loads((run_dir / "config.json").read_text())  # the resolved config
    assert init["resume"] == "allow" and init["id"] == (run_dir / "wandb_id.txt").read_text()
    assert "mode" not in init  # WANDB_MODE (or `wandb offline`) decides, not the run
    assert "W&B offline: project proj, run name" in capsys.readouterr().out
    assert [step for step, _ in fake_wandb.logs] == [1, 2]
    assert fake_wandb.logs == _as_logged(_records(run_dir))
    assert fake_wandb.finished == 1

    train_script.main(_args(demo_16, run_dir, "--wandb", "proj/name", "--max_steps", "3", "--resume", "auto"))
    assert fake_wandb.inits[1]["id"] == init["id"]  # the same W&B run continues
    assert fake_wandb.logs == _as_logged(_records(run_dir))  # steps 1, 2, then 3
    assert fake_wandb.finished == 2

    # --resume never starts over at step 0: a new W&B run; the old id moves aside with the old run
    train_script.main(_args(demo_16, run_dir, "--wandb", "proj", "--max_steps", "1", "--resume", "never"))
    new = fake_wandb.inits[2]
    assert new["id"] != init["id"] and new["name"] == "run"  # no name given: the run folder's
    (archive,) = run_dir.glob("previous-*")
    assert (archive / "wandb_id.txt").read_text() == init["id"]
    assert fake_wandb.logs[3:] == _as_logged(_records(run_dir))


def test_wandb_missing_is_one_line_before_the_run_folder_is_made(train_script, demo_16, tmp_path, no_wandb):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        train_script.main(_args(demo_16, run_dir, "--wandb", "proj/name"))
    message = str(info.value)
    assert "\n" not in message and "pip install wandb" in message and "drop --wandb" in message, message
    with pytest.raises(ValueError, match="--wandb a/b/c: expected 'project' or 'project/name'"):
        wandb_logger.import_wandb("a/b/c")
    assert not run_dir.exists()  # as for any other configuration error


def _progress_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("step ")]


LINE = re.compile(
    r"step (\d+)/5 \(\d+\.\d%\) \| loss \d+\.\d{4} \| \d+\.\d img/s \| lr \d\.\d\de[-+]\d\d"
    r" \| eta \d+(s|m\d\ds)"
)


@pytest.mark.parametrize("progress", ["lines", "auto"])  # auto: pytest's captured stdout is no terminal
def test_progress_lines_one_per_record_and_no_carriage_return(
    train_script, demo_16, tmp_path, capsys, no_wandb, progress
):
    # no_wandb: a run without --wandb never imports it
    train_script.main(
        _args(demo_16, tmp_path, "--max_steps", "5", "--log_every", "2", "--progress", progress)
    )
    out, err = capsys.readouterr()
    lines = _progress_lines(out)
    assert all(LINE.fullmatch(line) for line in lines), lines
    assert [int(LINE.fullmatch(line).group(1)) for line in lines] == [r["step"] for r in _records(tmp_path)]
    assert [r["step"] for r in _records(tmp_path)] == [2, 4, 5]
    assert "\r" not in out and "\r" not in err


@pytest.mark.parametrize("progress", ["bar", "auto"])
def test_progress_bar_on_a_terminal(train_script, demo_16, tmp_path, capsys, monkeypatch, progress):
    if progress == "auto":  # stdout and stderr are both pytest's CaptureIO: pretend they are terminals
        monkeypatch.setattr(type(sys.stdout), "isatty", lambda self: True, raising=False)
        assert sys.stdout.isatty() and sys.stderr.isatty()
    train_script.main(_args(demo_16, tmp_path, "--max_steps", "3", "--progress", progress))
    out, err = capsys.readouterr()
    assert _progress_lines(out) == []
    assert "\r" in err and "3/3" in err.split("\r")[-1] and err.endswith("\n")  # drawn, then closed


def test_progress_bar_is_closed_when_the_run_stops_on_an_error(train_script, demo_16, tmp_path, capsys):
    from rectok.training.runtime import NonFiniteLossError

    extra = ("--max_steps", "4", "--debug_nan_steps", "1,2", "--max_nonfinite", "2", "--progress", "bar")
    try:
        train_script.main(_args(demo_16, tmp_path, *extra))
    except NonFiniteLossError:
        # read while the error is handled, as train.py prints it: the bar (still referenced by the
        # traceback) must be closed already, so that the ERROR line starts on a line of its own
        err = capsys.readouterr().err
    else:
        pytest.fail("the run did not stop on its non-finite losses")
    assert "\r" in err and err.endswith("\n")
