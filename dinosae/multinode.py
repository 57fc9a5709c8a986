"""Several nodes per job: the launch line of a training rule whose job spans `nodes` nodes.

Inside the job (a Snakemake rule with resources nodes=N, tasks=N, mpi="srun", gres="gpu:G":
sbatch --nodes=N --ntasks=N --gres=gpu:G, and the jobstep runs the rule's shell directly),
`srun` starts one torchrun agent per node; the agents meet at a c10d rendezvous on the job's
first node, on a port and with a rendezvous id taken from the Slurm job id, and each starts G
ranks. Every value is a plain integer, so the line needs no quoting beyond its own.
"""

from __future__ import annotations

RDZV_PORT_BASE = 29500  # + job id mod RDZV_PORT_SPAN: two jobs on one node rarely collide
RDZV_PORT_SPAN = 20000


def torchrun_command(nodes: int, gpus_per_node: int, module: str = "dinosae") -> str:
    """`srun ... torchrun ... -m dinosae`: one agent per node, c10d rendezvous on the job's
    first node (the shell of the job's first step expands the $SLURM_* values)."""
    if nodes < 2 or gpus_per_node < 1:
        raise ValueError(f"a multi-node launch needs nodes >= 2 and GPUs per node >= 1, got "
                         f"{nodes} x {gpus_per_node}")
    head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    port = f"$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN} ))"
    return (f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
            f"torchrun --nnodes={nodes} --nproc_per_node={gpus_per_node} "
            f"--rdzv_backend=c10d --rdzv_endpoint={head}:{port} "
            f'--rdzv_id="$SLURM_JOB_ID" -m {module}')


def gpus_per_node(resources: dict) -> int:
    """GPUs per node of a job: the count of its `gres` ("gpu:8", "gpu:h100:8"), else `gpu`."""
    gres = str(resources.get("gres") or "")
    if gres.startswith("gpu"):
        last = gres.split(":")[-1]
        return int(last) if last.isdigit() else 1
    return int(resources.get("gpu", 0) or 0)
