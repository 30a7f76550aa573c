"""Process-group set-up and the few collectives the stages need.

One process per GPU. Where a process sits comes from the environment its launcher provides:

* ``torchrun`` and submitit (``TorchDistributedEnvironment().export()`` in
  :class:`simflow.launch.Call`): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* a plain ``srun`` step (``srun -n 16 simflow train ...`` inside an sbatch script), which sets
  none of those: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and the step's
  node list stand in for them (see :func:`resolve_environment`). Without this every task would
  believe it is alone and write the same checkpoints.

NCCL on GPUs, gloo on CPU. Everything that writes (checkpoints, MLflow, outputs) is gated on the
**global** rank 0, never on a local rank (the multi-node bug of the public TarFlow code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# torch is imported where it is used: reading the launcher's environment (check_launch_backend,
# on the submit host) must not load it.
if TYPE_CHECKING:
    import torch

__all__ = [
    "DistEnv",
    "all_reduce_mean_",
    "barrier",
    "broadcast_object",
    "check_launch_backend",
    "cuda_device_index",
    "first_slurm_host",
    "init_distributed",
    "mean_over_ranks",
    "resolve_environment",
    "shutdown",
    "slurm_master_port",
]

# Variables torchrun / submitit's export() set; RANK and WORLD_SIZE are the ones that must agree.
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Port range of the rendezvous port derived for a plain srun step (submitit uses the same range).
_PORT_LO, _PORT_HI = 20000, 60000


def _cpu_device() -> torch.device:
    import torch  # lazy: no torch on the submit host

    return torch.device("cpu")


@dataclass
class DistEnv:
    """Where this process sits.

    ``rank``: global rank in 0..world_size-1 (decides who writes); ``world_size``: number of
    processes of the job (one per GPU); ``local_rank``: rank among the processes of this node
    (decides the GPU); ``device``: the device this rank computes on; ``local_world_size``:
    processes on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu_device)
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that writes files and logs to MLflow."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are real (otherwise they are no-ops)."""
        return self.world_size > 1


# ------------------------------------------------------------------------------------------
# Reading the launcher's environment
# ------------------------------------------------------------------------------------------
def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-04,07],cpu1"`` → ``"gpu03"``.

    Only the first host is needed (it hosts rank 0 and the rendezvous), so only the first
    comma-separated entry (commas inside brackets do not count) is expanded, each bracket to its
    first number, zero padding kept.
    """
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = text[:end]
    host = re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return host


def slurm_master_port(job_id: int, step_id: int) -> int:
    """A rendezvous port that every task of one srun step computes alike (job and step ids)."""
    return _PORT_LO + (job_id * 1009 + step_id * 9176) % (_PORT_HI - _PORT_LO)


def resolve_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This process's place in the job, read from ``environ`` (default ``os.environ``).

    Returns ``{"rank", "world_size", "local_rank", "local_world_size", "master_addr",
    "master_port", "source"}``; ``source`` is ``"torch"`` (torchrun/submitit variables),
    ``"slurm"`` (a plain srun step with more than one task) or ``"single"``. ``master_addr``
    and ``master_port`` are None for a single process, and for ``"torch"`` when the launcher left
    them to env:// defaults. Inconsistent variables raise one ValueError naming them.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            have = "RANK" if "RANK" in env else "WORLD_SIZE"
            raise ValueError(
                f"{have} is set but {'WORLD_SIZE' if have == 'RANK' else 'RANK'} is not: launch with "
                "torchrun or launcher.backend=slurm/submitit-local (which set both), or unset it")
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK", 0)
        # unknown without LOCAL_WORLD_SIZE (set by torchrun and submitit): assume the least
        local_world = _int_var(env, "LOCAL_WORLD_SIZE", local_rank + 1)
        addr = env.get("MASTER_ADDR") or None
        port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
        source = "torch" if world > 1 else "single"
        if world > 1 and addr is None:
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: the processes cannot "
                             "find each other. Launch with torchrun or launcher.backend=slurm.")
    elif _int_var(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        # A plain `srun -n N simflow ...`: SLURM's own variables describe the step.
        rank = _int_var(env, "SLURM_PROCID")
        world = _int_var(env, "SLURM_STEP_NUM_TASKS")
        local_rank = _int_var(env, "SLURM_LOCALID", 0)
        nodes = _int_var(env, "SLURM_STEP_NUM_NODES", _int_var(env, "SLURM_NNODES", 1))
        local_world = max(local_rank + 1, -(-world // max(1, nodes)))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("inside an srun step with several tasks but SLURM_STEP_NODELIST / "
                             "SLURM_JOB_NODELIST is not set; cannot find the rank-0 host")
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        port = (_int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else
                slurm_master_port(_int_var(env, "SLURM_JOB_ID", 0), _int_var(env, "SLURM_STEP_ID", 0)))
        source = "slurm"
    else:
        return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
                "master_addr": None, "master_port": None, "source": "single"}
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1} (world size {world}): the launcher's "
                         "environment is inconsistent")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"local rank {local_rank} is not below the local world size {local_world}")
    return {"rank": rank, "world_size": world, "local_rank": local_rank,
            "local_world_size": local_world, "master_addr": addr, "master_port": port, "source": source}


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int) -> int:
    """Which visible GPU a rank uses.

    One GPU per rank: ``cuda:<local_rank>`` when every rank of the node sees all of the node's
    GPUs; ``cuda:0`` when the scheduler binds one GPU per task (``CUDA_VISIBLE_DEVICES`` names a
    single device). Fewer GPUs than ranks otherwise is an error, not two ranks on one GPU.
    """
    if device_count < 1:
        raise ValueError("CUDA was requested but no GPU is visible to this process")
    if device_count == 1:
        return 0
    if local_rank < device_count and local_world_size <= device_count:
        return local_rank
    raise ValueError(
        f"{local_world_size} ranks on this node but only {device_count} GPUs are visible: start one "
        "task per GPU (launcher.tasks_per_node = launcher.gpus_per_node, or torchrun "
        "--nproc_per_node = GPUs per node)")


def check_launch_backend(backend: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse to submit a job from every rank: under torchrun or a multi-task srun step, a
    launcher backend other than ``local`` would make each of the N ranks submit its own job."""
    if backend == "local":
        return
    where = resolve_environment(environ)
    if where["world_size"] > 1:
        raise ValueError(
            f"launcher.backend={backend} but this process is rank {where['rank']} of "
            f"{where['world_size']} ({'torchrun/submitit' if where['source'] == 'torch' else 'srun'}): "
            "every rank would submit its own job. Either run under torchrun/srun with "
            "launcher.backend=local, or run one plain `simflow` command with launcher.backend=slurm.")


# ------------------------------------------------------------------------------------------
# Process group
# ------------------------------------------------------------------------------------------
def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group described by the environment (or run as a single process).

    ``device``: ``"cuda"`` or ``"cpu"`` to force one; None picks CUDA when available. The backend
    is NCCL on CUDA and gloo on CPU. For a plain srun step the rendezvous address and port are
    derived from SLURM and exported as MASTER_ADDR/MASTER_PORT (env:// initialisation).
    """
    # lazy: the submit host reads the launcher's environment here without torch (see above)
    import torch
    import torch.distributed as dist

    where = resolve_environment()
    rank, world_size = where["rank"], where["world_size"]
    local_rank, local_world = where["local_rank"], where["local_world_size"]
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(cuda_device_index(local_rank, local_world, torch.cuda.device_count()))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if where["master_addr"] is not None:
            os.environ["MASTER_ADDR"] = str(where["master_addr"])
        if where["master_port"] is not None:
            os.environ["MASTER_PORT"] = str(where["master_port"])
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank,
                                world_size=world_size, device_id=dev if use_cuda else None)
    return DistEnv(rank, world_size, local_rank, dev, local_world)


def shutdown() -> None:
    """Leave the process group (no-op for a single process)."""
    import torch.distributed as dist  # lazy: no torch on the submit host

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for a single process)."""
    if env.enabled:
        import torch.distributed as dist  # lazy: no torch on the submit host

        dist.barrier()


# ------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------
def all_reduce_mean_(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Average floating-point tensors over ranks in place, one flat buffer (one collective) per dtype.

    Every rank must pass tensors of the same shapes in the same order (e.g. the gradients of one
    optimiser's parameters). The sum is divided by the world size, so with per-rank losses that
    are means over equal per-rank batches the result is the gradient of the global-batch mean.
    """
    if not env.enabled or not tensors:
        return
    if any(not (t.is_floating_point() or t.is_complex()) for t in tensors):
        raise TypeError("all_reduce_mean_ averages floating-point tensors only (an integer mean "
                        "cannot be stored in place); convert the tensor to float first")
    # lazy: the submit host reads the launcher's environment here without torch (see above)
    import torch
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= env.world_size
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def mean_over_ranks(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective); keys must be the same on every rank.

    Used for logging: rank 0's own losses describe 1/world of the global batch only.
    """
    keys = sorted(values)
    if not env.enabled or not keys:
        return {k: float(values[k]) for k in keys}
    import torch  # lazy: no torch on the submit host

    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean_([buf], env)
    return dict(zip(keys, buf.tolist()))


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects such as paths)."""
    if not env.enabled:
        return obj
    import torch.distributed as dist  # lazy: no torch on the submit host

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
