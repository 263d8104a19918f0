# Rendezvous for `srun torchrun` on a SLURM allocation, from SLURM's variables; sourced by every
# slurm/*.sbatch file (source it, do not run it). One torchrun per node (--ntasks-per-node=1)
# starts one process per GPU; the nodes meet through torchrun's c10d rendezvous on the first
# host of the job, so no node needs to know its own rank. Sets and exports:
#
#   MASTER_ADDR     first host of $SLURM_JOB_NODELIST (expanded by scontrol)
#   MASTER_PORT     kept if set, else 20000 + SLURM_JOB_ID % 10000 (the same on every node, and
#                   the port rectok.training.distributed derives for `srun python` without torchrun)
#   NNODES          $SLURM_NNODES
#   NPROC_PER_NODE  the count of --gpus-per-node ("a100:8" -> 8), else "gpu" (torchrun counts them)
#
# and TORCHRUN_ARGS, an array for `srun torchrun "${TORCHRUN_ARGS[@]}" train.py ...`.

_rendezvous_missing=""
for _var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES; do
    [ -n "${!_var:-}" ] || _rendezvous_missing="$_rendezvous_missing $_var"
done
if [ -n "$_rendezvous_missing" ]; then
    echo "slurm/rendezvous.sh: not set:$_rendezvous_missing (source it inside an sbatch job)" >&2
    unset _rendezvous_missing _var
    return 1
fi
unset _rendezvous_missing _var

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "$MASTER_ADDR" ]; then
    echo "slurm/rendezvous.sh: scontrol found no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'" >&2
    return 1
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
NNODES=$SLURM_NNODES
NPROC_PER_NODE=${SLURM_GPUS_PER_NODE:+${SLURM_GPUS_PER_NODE##*:}}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; the DataLoader workers need it.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

TORCHRUN_ARGS=(
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"
)
echo "rendezvous: $NNODES node(s) x $NPROC_PER_NODE process(es), c10d at $MASTER_ADDR:$MASTER_PORT" >&2
