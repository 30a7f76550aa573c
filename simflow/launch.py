"""Run one callable in-process, as a local submitit job, or as a SLURM job, and wait for it.

Generic submitit plumbing: nothing here knows what a stage is (:mod:`simflow.runner` turns a
stage into a :class:`Call` and hands it to :func:`launch`). The caller blocks until the job is
done, so a Snakemake rule's outputs appear only after the job succeeded::

    cfg = LauncherConfig.from_dict(config["launcher"])   # backend: local | submitit-local | slurm
    launch(Call("simflow.runner:run_stage", "train", "unit/config.yaml", []), cfg, job_name="train")

Backends:

* ``local``: ``fn()`` in this process (no submitit, no pickling; exceptions propagate as is).
* ``submitit-local``: ``submitit.AutoExecutor(cluster="local")``, a subprocess on this machine.
* ``slurm``: ``submitit.AutoExecutor(cluster="slurm")``. The cluster is always named explicitly:
  auto-detection picks SLURM whenever ``srun`` is on PATH. The ``debug`` executor is never used
  (it opens pdb on failure).

While waiting, SIGINT/SIGTERM (Ctrl-C, Snakemake stopping a rule) cancel the job and exit with
``128 + signum``, so no orphan GPU job keeps running. A job that ends without a result (cancelled,
out of memory, time limit, node failure) raises :class:`LaunchError` naming its log files.
Requeue after a time-out or preemption is submitit's: the callable's ``checkpoint`` method
(see :class:`Call`) resubmits the same call, which resumes from its latest checkpoint.
Imported on the submit host, this module loads submitit but neither torch nor MLflow.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from simflow.config import LauncherSection
from simflow.contracts import BACKENDS

__all__ = [
    "BACKENDS",
    "LaunchError",
    "LauncherConfig",
    "Call",
    "build_executor",
    "export_distributed_env",
    "launch",
    "wait_for",
]

# Scheduler states of a job that is over without having run to completion (SLURM's sacct names;
# INTERRUPTED is submitit-local's name for a controller killed by a signal). PREEMPTED and
# REQUEUED are not here: submitit requeues such jobs and they come back.
_DEAD_STATES = frozenset(
    {"CANCELLED", "FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
     "REVOKED", "INTERRUPTED"}
)

_STDERR_TAIL_LINES = 30
_REMOTE_ERROR_MAX_CHARS = 6000


class LaunchError(RuntimeError):
    """A submitted job failed or ended without a result; the message names its log files and
    holds the job's error and the tail of its stderr."""


def _say(msg: str) -> None:
    print(f"[simflow.launch] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
#: Where and with which resources a stage runs: the ``launcher:`` section of a config, one class
#: with one validation (each key's type and range, then the checks across keys), built from a plain
#: mapping with ``LauncherConfig.from_dict(config["launcher"])``. Units: ``timeout_min`` minutes of
#: wall time per attempt; ``signal_delay_s`` seconds before the time limit at which the job gets the
#: checkpoint signal (USR2); ``mem_gb`` GiB per node (None: the partition's default).
#: ``gpus_per_node`` GPUs per node; one task per GPU is started (``tasks_per_node =
#: gpus_per_node``, or 1 without GPUs) unless ``tasks_per_node`` is given. ``max_num_timeout``: how
#: many times a time-out may requeue a checkpointable job. ``extra_sbatch``: further ``#SBATCH``
#: options (``{"mail-type": "END"}``); ``setup``: shell lines run in the sbatch script before the
#: job (``module load ...``); both SLURM only. ``log_dir``: submitit's folder; a job's logs are
#: ``<log_dir>/<job_name>/<job id>/``.
LauncherConfig = LauncherSection


# --------------------------------------------------------------------------------------------
# submitit plumbing
# --------------------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "job"


def build_executor(cfg: LauncherConfig, job_name: str) -> submitit.AutoExecutor:
    """The submitit executor for ``cfg`` (backend submitit-local or slurm), parameters set.

    Jobs write to ``<log_dir>/<job_name>/<job id>/``: ``<id>_<task>_log.out|err`` and pickles.
    """
    if cfg.backend == "local":
        raise ValueError("backend 'local' runs in-process and has no submitit executor")
    folder = Path(cfg.log_dir).expanduser().resolve() / _safe_name(job_name) / "%j"
    slurm = cfg.backend == "slurm"
    cluster = "slurm" if slurm else "local"
    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster=cluster, **{f"{cluster}_max_num_timeout": cfg.max_num_timeout}
        )
    except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
        raise LaunchError(
            f"backend 'slurm' needs the SLURM client tools (srun, sbatch, sacct) on PATH: {e}. "
            "Run on a cluster login node, or use backend 'submitit-local' / 'local'."
        ) from e
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": cfg.timeout_min,
        "nodes": cfg.nodes,
        "gpus_per_node": cfg.gpus_per_node,
        "tasks_per_node": cfg.effective_tasks_per_node(),
        "cpus_per_task": cfg.cpus_per_task,
    }
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if slurm:
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(cfg, name) is not None:
                params[f"slurm_{name}"] = getattr(cfg, name)
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.extra_sbatch:
            params["slurm_additional_parameters"] = {str(k).lstrip("-"): v for k, v in cfg.extra_sbatch.items()}
        if cfg.setup:
            params["slurm_setup"] = list(cfg.setup)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _clean_env_if_nested() -> Iterator[None]:
    """Submitting from inside a SLURM/submitit job: hide the inherited SLURM_*/SUBMITIT_*/rank
    variables (they break the child's allocation), but keep SLURM_CONF, which submitit's
    clean_env also strips (submitit#1814) and sbatch needs on sites that set it."""
    if not any(k in os.environ for k in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR")):
        yield
        return
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf is not None:
            os.environ["SLURM_CONF"] = slurm_conf
        yield


def _task_jobs(job: submitit.Job) -> list[submitit.Job]:
    return [job.task(k) for k in range(job.num_tasks)] if job.num_tasks > 1 else [job]


def _log_paths(job: submitit.Job) -> tuple[Path, Path]:
    """stdout/stderr of task 0 (the one whose result launch returns)."""
    first = _task_jobs(job)[0]
    return first.paths.stdout, first.paths.stderr


def _state(job: submitit.Job) -> str:
    try:
        return str(job.state)
    except Exception as e:  # sacct hiccups must not kill the waiter
        return f"UNKNOWN ({e})"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _failure(job: submitit.Job, job_name: str, what: str, remote_error: str | None = None) -> LaunchError:
    stdout, stderr = _log_paths(job)
    lines = [f"{job_name}: job {job.job_id} {what}.", f"  stdout: {stdout}", f"  stderr: {stderr}"]
    if job.num_tasks > 1:
        lines.append(f"  (one log pair per task: {stdout.parent}/{job.job_id}_<task>_log.out|err)")
    if remote_error:
        err = remote_error.strip()
        if len(err) > _REMOTE_ERROR_MAX_CHARS:
            err = "...\n" + err[-_REMOTE_ERROR_MAX_CHARS:]
        lines += ["--- error reported by the job ---", err]
    tail = _tail(stderr, _STDERR_TAIL_LINES)
    if tail:
        lines += [f"--- last {_STDERR_TAIL_LINES} lines of {stderr} ---", tail]
    return LaunchError("\n".join(lines))


def wait_for(job: submitit.Job, job_name: str, poll_s: float = 1.0) -> Any:
    """Block until ``job`` is over; return task 0's result or raise :class:`LaunchError`.

    ``job.done()`` turns true when the result pickle appears or the scheduler reports a final
    state (submitit polls ``sacct`` at growing intervals, at most once a minute). A job that ends
    in a dead state (cancelled, OOM, time limit, node failure; for submitit-local, any exit)
    without a result pickle raises at once instead of waiting for a result that never comes.
    State changes are printed to stderr.
    """
    last = None
    while not job.done():
        state = _state(job)
        # UNKNOWN: sacct has no record yet (or, without slurmdbd, until the job ends): not news
        if state != last and not state.startswith("UNKNOWN"):
            _say(f"{job_name}: job {job.job_id} {state}")
            last = state
        time.sleep(poll_s)
    state = _state(job)
    base = state.split()[0].upper() if state.strip() else "UNKNOWN"
    local = isinstance(job, submitit.LocalJob)
    if not _task_jobs(job)[0].paths.result_pickle.exists() and (base in _DEAD_STATES or local):
        # submitit-local: the files are on the local disk, so no result now means none ever.
        raise _failure(job, job_name, f"ended in state {state} without a result")
    try:
        results = job.results()
    except (FailedJobError, UncompletedJobError) as e:
        raise _failure(job, job_name, f"failed (state {state})", str(e)) from None
    _say(f"{job_name}: job {job.job_id} done")
    return results[0]


@contextlib.contextmanager
def _cancel_on_signals(holder: dict[str, Any], job_name: str) -> Iterator[None]:
    """While waiting, SIGINT/SIGTERM cancel the job and exit with 128 + signum.

    A signal that arrives while the job is being submitted is held until ``holder["job"]`` is
    set (see :func:`_after_submit`), so a just-submitted job is never left behind. Signal
    handlers can only be installed from the main thread; elsewhere nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        job = holder.get("job")
        if job is None:
            holder["signal"] = signum
            return
        _cancel_and_exit(job, job_name, signum)

    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _cancel_and_exit(job: submitit.Job, job_name: str, signum: int) -> None:
    _say(f"{job_name}: got {signal.Signals(signum).name}, cancelling job {job.job_id}")
    try:
        job.cancel(check=False)
    except Exception as e:  # exit anyway; the message says what to clean up by hand
        _say(f"{job_name}: could not cancel job {job.job_id} ({e}); cancel it by hand")
    sys.exit(128 + signum)


def launch(
    fn: Callable[[], Any],
    cfg: LauncherConfig,
    job_name: str,
    *,
    on_submit: Callable[[submitit.Job], None] | None = None,
    poll_s: float = 1.0,
) -> Any:
    """Run ``fn()`` with the backend of ``cfg`` and return its result (task 0's for a job with
    several tasks).

    ``local`` calls ``fn()`` here and lets its exceptions through. The submitit backends pickle
    ``fn`` (cloudpickle: module-level callables travel by reference, so their package must be
    importable in the job), print the job id and log paths to stderr, call ``on_submit(job)``
    (e.g. to record the job id), and wait (:func:`wait_for`); failures raise
    :class:`LaunchError`. SIGINT/SIGTERM while waiting cancel the job and exit 128 + signum.
    """
    if cfg.backend == "local":
        _say(f"{job_name}: running in this process (backend local)")
        return fn()
    executor = build_executor(cfg, job_name)
    holder: dict[str, Any] = {}
    with _cancel_on_signals(holder, job_name):
        with _clean_env_if_nested():
            job = executor.submit(fn)
        holder["job"] = job
        stdout, stderr = _log_paths(job)
        _say(
            f"{job_name}: submitted {cfg.backend} job {job.job_id} "
            f"({cfg.nodes} node(s) x {cfg.effective_tasks_per_node()} task(s)); "
            f"logs: {stdout} and {stderr}"
        )
        if "signal" in holder:  # a signal arrived during submission
            _cancel_and_exit(job, job_name, holder["signal"])
        if on_submit is not None:
            on_submit(job)
        return wait_for(job, job_name, poll_s=poll_s)


# --------------------------------------------------------------------------------------------
# the callable submitted
# --------------------------------------------------------------------------------------------
def export_distributed_env() -> dict[str, str] | None:
    """Inside a submitit job with more than one task, export MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for ``torch.distributed`` (env:// init) and
    return them; otherwise (single task, or not under submitit) do nothing and return None.

    CUDA_VISIBLE_DEVICES is left alone: each rank selects ``cuda:<LOCAL_RANK>`` itself, which
    keeps all GPUs of the node visible for NCCL peer-to-peer. Values from the job environment
    overwrite inherited ones (a job launched from a shell that had RANK set).
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return None
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size),
    }


class Call:
    """A picklable, checkpointable call ``function(*args, **kwargs)`` of a module-level function
    named ``"package.module:function"``.

    The function is imported only where the call runs (inside the job), so neither pickling a
    Call nor submitting it imports the module that defines the function: the launcher stays
    generic and the submit host loads nothing of the job's code. Inside a job with more than one
    task the ``torch.distributed`` variables are exported first (:func:`export_distributed_env`).
    On a time-out or preemption submitit calls :meth:`checkpoint`, which resubmits the same call
    (the function is expected to resume from its own checkpoint files).
    """

    def __init__(self, target: str, *args: Any, **kwargs: Any) -> None:
        module, sep, function = target.partition(":")
        if not sep or not module or not function.isidentifier():
            raise ValueError(f"call target {target!r} is not of the form 'package.module:function'")
        self.target = target
        self.args = args
        self.kwargs = kwargs

    def resolve(self) -> Callable[..., Any]:
        """The function named by :attr:`target` (imports its module)."""
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)

    def __call__(self) -> Any:
        export_distributed_env()
        return self.resolve()(*self.args, **self.kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same call (the function resumes from its latest checkpoint)."""
        return submitit.helpers.DelayedSubmission(Call(self.target, *self.args, **self.kwargs))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Call) and (self.target, self.args, self.kwargs) == (
            other.target, other.args, other.kwargs)

    def __repr__(self) -> str:
        parts = [repr(self.target), *map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        return f"Call({', '.join(parts)})"
