"""`srun python train.py ...` without torchrun (one SLURM task per GPU): torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) derived from SLURM's, with SLURM's compact host
list expanded here rather than by `scontrol` (which a task may not have). The sbatch examples that
use torchrun keep the same logic in slurm/rendezvous.sh."""

from __future__ import annotations

import re
from collections.abc import Mapping

_HOST = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # one name, maybe with bracket groups: gpu[001-004,007]-ib


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list as host names, in order, without calling `scontrol`.

    "gpu[001-003,007],login1" -> ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]. A range keeps
    the zero padding of its first number; several bracket groups in one name expand as a product
    ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2).
    """
    if not re.fullmatch(rf"{_HOST}(?:,{_HOST})*", hostlist):
        raise ValueError(f"not a SLURM host list: {hostlist!r}")
    hosts: list[str] = []
    for name in re.findall(_HOST, hostlist):
        expanded = [""]
        # re.split with a group alternates text outside brackets and the inside of each group.
        for i, piece in enumerate(re.split(r"\[([^\]]*)\]", name)):
            options = _expand_group(piece, hostlist) if i % 2 else [piece]
            expanded = [head + option for head in expanded for option in options]
        hosts += expanded
    return hosts


def _expand_group(group: str, hostlist: str) -> list[str]:
    """The inside of one bracket group: "001-003,007" -> ["001", "002", "003", "007"]."""
    numbers = []
    for item in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"not a SLURM host list: {hostlist!r} (bad range {item!r})")
        lo, hi = match[1], match[2] or match[1]
        numbers += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return numbers


def _slurm_int(env: Mapping[str, str], *names: str) -> int:
    """The first of `names` that is set, as an int (ValueError naming the variable otherwise)."""
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is not an integer") from None
    raise ValueError(
        f"launched as a SLURM task (SLURM_PROCID is set) but {' / '.join(names)} is not: start "
        "the tasks with srun (one per GPU), or launch with torchrun (see slurm/README.md)"
    )


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for one task of `srun python ...` (one task per GPU), from SLURM's.

    {} when torchrun's RANK / WORLD_SIZE are set (torchrun, or `srun torchrun`, is in charge), when
    this is no SLURM task (no SLURM_PROCID), or for a one-task step. MASTER_ADDR and MASTER_PORT
    are kept when set; otherwise the address is the step's first host and the port comes from
    SLURM_JOB_ID, so that every task of the job computes the same rendezvous without talking.
    """
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return {}
    # srun sets SLURM_STEP_NUM_TASKS for its tasks; the batch script itself has only the
    # allocation's SLURM_NTASKS, and a lone process there would wait for ranks that never start.
    if "SLURM_STEP_NUM_TASKS" not in env and env.get("ENVIRONMENT") == "BATCH":
        if "SLURM_NTASKS" in env and _slurm_int(env, "SLURM_NTASKS") > 1:
            raise ValueError(
                f"this is the SLURM batch script itself (SLURM_NTASKS={env['SLURM_NTASKS']}, no "
                "SLURM_STEP_NUM_TASKS): start one task per GPU with `srun python ...`, or use "
                "`srun torchrun ...` (see slurm/README.md)"
            )
        return {}
    world_size = _slurm_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if world_size == 1:
        return {}
    rank = _slurm_int(env, "SLURM_PROCID")
    local_rank = _slurm_int(env, "SLURM_LOCALID")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        names = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        name = next((n for n in names if env.get(n)), None)
        if name is None:
            raise ValueError(
                f"a SLURM step of {world_size} tasks but none of {' / '.join(names)} is set, so the "
                "rank-0 host is unknown: set MASTER_ADDR to it, or start the tasks with srun"
            )
        try:
            addr = expand_hostlist(env[name])[0]
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if "MASTER_PORT" in env:
        port = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        # 20000-29999: below Linux's ephemeral range (32768+), so no outgoing connection holds it;
        # two jobs that share their first node get different ports unless their ids differ by a
        # multiple of 10000.
        port = str(20000 + _slurm_int(env, "SLURM_JOB_ID") % 10000)
    else:
        raise ValueError(
            f"a SLURM step of {world_size} tasks but neither MASTER_PORT nor SLURM_JOB_ID is set: "
            "set MASTER_PORT to a free port (the same for every task)"
        )
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }
