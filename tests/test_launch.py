"""Launching at scale: SLURM's variables become the rendezvous, for `srun python` and for `srun torchrun`.

- `expand_hostlist` reads SLURM's compact host lists (ranges, zero padding, several groups, bracket
  products, single hosts) and refuses malformed ones.
- `slurm_environment` turns an srun task's variables into torchrun's (rank, world size, local rank,
  first host of the step, a port from the job id), leaves torchrun and single-process runs alone,
  and names the missing variable in a one-line ValueError (also printed as one line by train.py).
- For real: two processes with only SLURM's variables (as `srun python` starts them) join one gloo
  group of size 2 through `init_distributed`, and `python train.py` runs as two ranks that way.
- `slurm/rendezvous.sh`, sourced with fake SLURM variables and a fake `scontrol`, exports the
  rendezvous and torchrun arguments that start a real 2-process torchrun; every `slurm/*.sbatch`
  passes `bash -n`, and run with fake `srun` / `scontrol` it launches torchrun with arguments that
  torchrun, train.py / sample.py and the global batch accept.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from rectok.training import distributed as D
from rectok.training import slurm as S
from rectok.training.config import PRESETS, build_parser

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
SBATCH_FILES = sorted(SLURM_DIR.glob("*.sbatch"))
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any launcher's variables (SLURM's, torchrun's), plus `extra`."""
    launcher = ("SLURM_", "SRUN_", "TORCHELASTIC_", "PET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    for k in (*TORCHRUN_VARS, "LOCAL_WORLD_SIZE", "GROUP_RANK", "ENVIRONMENT"):
        env.pop(k, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _free_port_and_job_id() -> tuple[int, int]:
    """A free port in the range slurm_environment derives ports from, and a job id that yields it."""
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, 4_560_000 + port - 20000
    raise RuntimeError("no free port in 20000-29999")


# ----------------------------------------------------------------------------- host lists
@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("gpu001", ["gpu001"]),
        ("login1,gpu7", ["login1", "gpu7"]),
        ("gpu[001-004]", ["gpu001", "gpu002", "gpu003", "gpu004"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),  # no padding: widths grow
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),  # padding of the first number
        ("gpu[001-002,007],login1", ["gpu001", "gpu002", "gpu007", "login1"]),
        ("a[1-2],b[09-10],c", ["a1", "a2", "b09", "b10", "c"]),
        ("gpu[3]", ["gpu3"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("127.0.0.1", ["127.0.0.1"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert S.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "hostlist", ["", "gpu[001-004", "gpu]1", "a,,b", "a,", "n[]", "n[4-2]", "n[a-b]", "n[[1]]"]
)
def test_expand_hostlist_refuses_malformed_lists(hostlist):
    with pytest.raises(ValueError, match="not a SLURM host list"):
        S.expand_hostlist(hostlist)


# ----------------------------------------------------------------------------- SLURM -> torchrun
SRUN_TASK = {  # what srun gives task 5 of 8 (4 per node, second node) of job 123456
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[003-004],login1",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
}


def test_srun_task_gets_torchrun_variables():
    assert S.slurm_environment(SRUN_TASK) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(20000 + 123456 % 10000),
    }


def test_step_variables_win_over_the_allocation():
    # a step on part of the allocation: its own task count and first node, not the job's
    env = {**SRUN_TASK, "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu004", "SLURM_PROCID": "0"}
    out = S.slurm_environment(env)
    assert out["WORLD_SIZE"] == "8" and out["MASTER_ADDR"] == "gpu004"


def test_only_ntasks_and_job_nodelist_suffice():
    env = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP_")}
    out = S.slurm_environment(env)
    assert out["WORLD_SIZE"] == "8" and out["MASTER_ADDR"] == "gpu003"


def test_master_addr_and_port_that_are_set_are_kept():
    out = S.slurm_environment({**SRUN_TASK, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29501"})
    assert out["MASTER_ADDR"] == "10.0.0.9" and out["MASTER_PORT"] == "29501"
    # with MASTER_ADDR set, no node list is needed
    no_list = {k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}
    assert S.slurm_environment({**no_list, "MASTER_ADDR": "h"})["MASTER_ADDR"] == "h"


def test_port_is_the_same_for_every_task_and_in_the_high_range():
    ports = {S.slurm_environment({**SRUN_TASK, "SLURM_PROCID": str(r)})["MASTER_PORT"] for r in range(8)}
    assert len(ports) == 1
    for job in (1, 9999, 10000, 987654321):
        port = int(S.slurm_environment({**SRUN_TASK, "SLURM_JOB_ID": str(job)})["MASTER_PORT"])
        assert 20000 <= port < 30000


@pytest.mark.parametrize(
    "env",
    [
        {},  # no launcher: single process
        {**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "2"},  # torchrun (e.g. `srun torchrun`) is in charge
        {**SRUN_TASK, "WORLD_SIZE": "1"},
        {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a[1-4]"},  # salloc shell: no task
        {**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"},  # `srun -n1 python ...`
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "ENVIRONMENT": "BATCH"},  # batch script, one task
        {"SLURM_PROCID": "0", "ENVIRONMENT": "BATCH"},  # batch script of a job without --ntasks
    ],
)
def test_nothing_to_derive(env):
    assert S.slurm_environment(env) == {}


@pytest.mark.parametrize(
    "drop, names",
    [
        (("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"), ["SLURM_STEP_NODELIST", "MASTER_ADDR"]),
        (("SLURM_LOCALID",), ["SLURM_LOCALID"]),
        (("SLURM_JOB_ID",), ["SLURM_JOB_ID", "MASTER_PORT"]),
        (("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"), ["SLURM_NTASKS", "srun"]),
    ],
)
def test_missing_variable_is_one_actionable_line(drop, names):
    env = {k: v for k, v in SRUN_TASK.items() if k not in drop}
    with pytest.raises(ValueError) as err:
        S.slurm_environment(env)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names), message


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"SLURM_STEP_NODELIST: not a SLURM host list: 'gpu\[1-'"):
        S.slurm_environment({**SRUN_TASK, "SLURM_STEP_NODELIST": "gpu[1-"})
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        S.slurm_environment({**SRUN_TASK, "SLURM_PROCID": "x"})


def test_batch_script_itself_is_refused():
    # `python train.py` in an sbatch script of 8 tasks, without srun: one process would wait for 7
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "a[1-2]", "ENVIRONMENT": "BATCH"}
    with pytest.raises(ValueError, match=r"batch script itself .*srun python"):
        S.slurm_environment({**env, "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0"})
    # the tasks srun starts from that script inherit ENVIRONMENT=BATCH and are fine
    assert S.slurm_environment({**SRUN_TASK, "ENVIRONMENT": "BATCH"})["WORLD_SIZE"] == "8"


def test_init_distributed_single_task_step_leaves_environment_alone(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in {**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(k, v)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled) == (0, 1, False)
    assert not any(k in os.environ for k in TORCHRUN_VARS)


def test_train_py_prints_a_missing_slurm_variable_as_one_line(tmp_path):
    env = _clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_ID="5")
    proc = subprocess.run(
        [sys.executable, "train.py", "--run_dir", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "SLURM_JOB_NODELIST" in lines[0], lines
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- srun python, for real
GROUP_CHECK = """
import json, os, torch, torch.distributed as dist
from rectok.training import distributed as D
info = D.init_distributed("cpu")
total = torch.tensor([float(info.rank + 1)])
dist.all_reduce(total)
env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
row = {"rank": info.rank, "world": info.world_size, "local": info.local_rank, "sum": total.item()}
line = json.dumps({**row, "group": dist.get_world_size(), **env})
if os.environ.get("ROW_DIR"):  # torchrun's children share one stdout: their lines can interleave
    with open(os.path.join(os.environ["ROW_DIR"], f"rank{info.rank}.json"), "w") as f:
        f.write(line)
print(line)
D.shutdown()
"""


def _run_tasks(cmd: list[str], tmp_path: Path, timeout: int) -> tuple[int, list[tuple[int, str, str]]]:
    """Run `cmd` as two tasks the way srun starts them (SLURM's variables only, no torchrun's) on
    the host "localhost"; returns the port they should meet on and (returncode, stdout, stderr)
    per rank."""
    port, job_id = _free_port_and_job_id()
    procs = []
    for rank in range(2):
        env = _clean_env(
            SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
        )  # fmt: skip
        out, err = tmp_path / f"rank{rank}.out", tmp_path / f"rank{rank}.err"
        with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: neither rank can block on one
            procs.append((subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=ROOT), out, err))
    try:
        for proc, _, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return port, [(proc.returncode, out.read_text(), err.read_text()) for proc, out, err in procs]


def test_srun_python_tasks_join_one_gloo_group(tmp_path):
    port, results = _run_tasks([sys.executable, "-c", GROUP_CHECK], tmp_path, timeout=120)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    rows = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    for rank, row in enumerate(rows):
        assert (row["rank"], row["world"], row["local"], row["group"]) == (rank, 2, rank, 2)
        assert row["sum"] == 3.0  # 1 + 2: both ranks are in the same group
        assert (row["MASTER_ADDR"], row["MASTER_PORT"], row["WORLD_SIZE"]) == ("localhost", str(port), "2")


def test_srun_python_train_py_runs_as_two_ranks(demo_16, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "--data.path", str(demo_16), "--run_dir", str(run_dir), "--device", "cpu",
        "--global_batch", "8", "--micro_batch", "4", "--max_steps", "1", "--log_every", "1",
        "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false", "--data.eval_images", "4",
        "--data.num_workers", "0", "--progress", "lines",
    ]  # fmt: skip
    _, results = _run_tasks(cmd, tmp_path, timeout=240)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["world_size"] == 2  # the derived variables reach the environment report too
    ckpt = torch.load(sorted(run_dir.glob("ckpt_*.pt"))[-1], weights_only=True, map_location="cpu")
    assert ckpt["data"]["world_size"] == 2 and len(ckpt["rng"]) == 2


# ----------------------------------------------------------------------------- slurm/rendezvous.sh
FAKE_SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST, for the lists the tests use
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 2; }
case "$3" in
  "gpu[001-002]") printf 'gpu001\\ngpu002\\n' ;;
  localhost) echo localhost ;;
  *) echo "fake scontrol: unknown list $3" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A folder with fake `scontrol` and `srun` (which records its arguments, one per line, in $SRUN_LOG)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _source_rendezvous(
    fake_bin: Path, script: str, options: str = "set -euo pipefail", **slurm: str
) -> subprocess.CompletedProcess:
    """bash: `options` (the sbatch files' by default), source slurm/rendezvous.sh, and if that
    succeeded, run `script`."""
    env = _clean_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **slurm)
    cmd = f"{options}\nsource {SLURM_DIR / 'rendezvous.sh'} && {{ {script}; }}"
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)


JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2"}


def test_rendezvous_exports_the_first_host_port_and_counts(fake_bin):
    proc = _source_rendezvous(
        fake_bin, 'env; printf "ARG %s\\n" "${TORCHRUN_ARGS[@]}"', **JOB, SLURM_GPUS_PER_NODE="h100:8",
        SLURM_CPUS_PER_TASK="64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    exported = dict(line.split("=", 1) for line in lines if "=" in line and " " not in line)
    assert exported["MASTER_ADDR"] == "gpu001"
    assert exported["MASTER_PORT"] == str(20000 + 4242 % 10000)  # the port distributed.py derives too
    assert exported["NNODES"] == "2" and exported["NPROC_PER_NODE"] == "8"
    assert exported["SRUN_CPUS_PER_TASK"] == "64"
    args = [line[4:] for line in lines if line.startswith("ARG ")]
    assert args == [
        "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu001:24242", "--rdzv_id", "4242",
    ]  # fmt: skip
    python_side = S.slurm_environment({**SRUN_TASK, "SLURM_JOB_ID": "4242"})
    assert python_side["MASTER_PORT"] == exported["MASTER_PORT"]


def test_rendezvous_keeps_a_set_port_and_lets_torchrun_count_gpus(fake_bin):
    proc = _source_rendezvous(fake_bin, 'echo "$MASTER_PORT $NPROC_PER_NODE"', **JOB, MASTER_PORT="29555")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["29555", "gpu"]


@pytest.mark.parametrize("options", ["set -euo pipefail", ""], ids=["sbatch-options", "plain-shell"])
@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID"])
def test_rendezvous_outside_a_job_fails_naming_the_variable(fake_bin, missing, options):
    job = {k: v for k, v in JOB.items() if k != missing}
    proc = _source_rendezvous(fake_bin, "echo reached", options, **job)
    assert proc.returncode != 0 and "reached" not in proc.stdout
    assert missing in proc.stderr


def test_rendezvous_arguments_start_a_real_torchrun(fake_bin, tmp_path):
    port, job_id = _free_port_and_job_id()
    script = tmp_path / "group.py"
    script.write_text(GROUP_CHECK)
    run = f'cd {ROOT}; {sys.executable} -m torch.distributed.run "${{TORCHRUN_ARGS[@]}}" {script}'
    proc = _source_rendezvous(
        fake_bin, run, SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
        SLURM_GPUS_PER_NODE="2", ROW_DIR=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in rows)


# ----------------------------------------------------------------------------- slurm/*.sbatch
def test_every_stage_has_an_sbatch_file():
    stages = {"tokenizer.sbatch", "decoder.sbatch", "dit.sbatch", "sample.sbatch"}
    assert {f.name for f in SBATCH_FILES} == stages


@pytest.mark.parametrize("sbatch", SBATCH_FILES, ids=lambda p: p.name)
def test_sbatch_file_is_valid_bash(sbatch):
    proc = subprocess.run(["bash", "-n", str(sbatch)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _directives(sbatch: Path) -> dict[str, str]:
    """The #SBATCH options of the header (sbatch reads them up to the first command)."""
    out = {}
    for line in sbatch.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            out[match[1]] = match[2] or ""
    return out


@pytest.mark.parametrize("sbatch", SBATCH_FILES, ids=lambda p: p.name)
def test_sbatch_file_launches_torchrun_with_valid_arguments(sbatch, fake_bin, tmp_path):
    sbatch_options = _directives(sbatch)
    for option in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output", "requeue"):
        assert option in sbatch_options, f"{sbatch.name}: no #SBATCH --{option}"
    assert sbatch_options["ntasks-per-node"] == "1"  # one torchrun per node
    nodes, gpus = int(sbatch_options["nodes"]), int(sbatch_options["gpus-per-node"].split(":")[-1])

    submit = tmp_path / "submit"  # a stand-in checkout: the real rendezvous.sh, a no-op venv
    (submit / "slurm").mkdir(parents=True)
    (submit / "slurm" / "rendezvous.sh").write_text((SLURM_DIR / "rendezvous.sh").read_text())
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    env = _clean_env(
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SRUN_LOG=str(tmp_path / "srun.args"),
        SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_ID="777", SLURM_JOB_NODELIST="gpu[001-002]",
        SLURM_NNODES=str(nodes), SLURM_GPUS_PER_NODE=str(gpus), SLURM_CPUS_PER_TASK="64",
    )  # fmt: skip
    proc = subprocess.run(["bash", str(sbatch)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun.args").read_text().splitlines()
    assert argv[0] == "torchrun"

    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(argv[1:])
    assert (launch.nnodes, launch.nproc_per_node) == (str(nodes), str(gpus))
    assert (launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id) == ("c10d", "gpu001:20777", "777")
    script, args = launch.training_script, launch.training_script_args
    if script == "sample.py":
        sample = load_script("sample.py")
        assert sample.build_parser().parse_args(args).preset in sample.PRESETS
        return
    assert script == "train.py"
    # Every option exists and parses, and the global batch splits over nodes x GPUs. (build_parser,
    # not parse_args: parse_args validates the decoder / dit presets before it applies the command
    # line, so it refuses them for lack of --tok.init_from / --dit.tokenizer_ckpt.)
    options = vars(build_parser().parse_args(args))
    assert options["resume"] == "auto"  # a requeued job continues
    preset = PRESETS[(options["stage"], options["preset"])]
    micro_batch = int(options.get("micro_batch", preset["micro_batch"]))
    assert preset["global_batch"] % (micro_batch * nodes * gpus) == 0, (micro_batch, nodes * gpus)
