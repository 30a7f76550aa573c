"""submitit against a real (local, single-node) SLURM.

These tests need the throwaway SLURM cluster that ``tests/slurm/setup_local_slurm.sh start``
brings up (one node, partition ``debug``, 2 fake GPUs, the ``sacct --completion`` shim). They
skip, naming that script, when ``sinfo`` is not on PATH or the controller does not answer.

They check what the workflow's launcher relies on:
- a submitted function's return value comes back, and the job sees ``SLURM_JOB_ID`` and a
  ``CUDA_VISIBLE_DEVICES`` naming exactly one of the node's GPUs;
- a 2-task job runs 2 tasks with distinct global ranks 0 and 1 (submitit ``JobEnvironment``);
- ``job.result()`` on a scancel'ed job raises instead of waiting forever.

Every wait is bounded (``_result_within``), so a broken cluster fails the test instead of
hanging CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from local_slurm import SETUP_SCRIPT, skip_without_slurm

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

PARTITION = "debug"
N_FAKE_GPUS = 2
# submit -> result takes 1-3 s on the local cluster; leave room for a slow CI runner.
RESULT_BOUND_S = 90.0
# A cancelled job: submitit polls sacct, then waits 15 s for a late result file before raising.
CANCEL_BOUND_S = 90.0


pytestmark = [
    pytest.mark.slurm,
    skip_without_slurm,
]

# The job functions below live in this test module, which the job's fresh interpreter cannot
# import by name (pytest puts tests/ on sys.path only in this process). Pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------- job bodies (run on the node) --


def _square_with_env(x: int) -> tuple[int, dict[str, str | None]]:
    keys = ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "SUBMITIT_EXECUTOR")
    return x * x, {k: os.environ.get(k) for k in keys}


def _rank_info() -> dict[str, Any]:
    env = submitit.JobEnvironment()
    return {
        "global_rank": env.global_rank,
        "num_tasks": env.num_tasks,
        "job_id": env.job_id,
        "pid": os.getpid(),
    }


def _sleep_long() -> str:
    time.sleep(600)
    return "not cancelled"


# ------------------------------------------------------------------------------------- helpers --


def _executor(folder: Path, **params: Any) -> "submitit.AutoExecutor":
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=5, mem_gb=1, **params)
    return ex


def _call_within(fn: Any, bound_s: float) -> tuple[bool, Any, BaseException | None, float]:
    """Run fn() in a daemon thread; (finished, value, exception, seconds) after at most bound_s."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["exc"] = exc

    t0 = time.monotonic()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(bound_s)
    return not th.is_alive(), box.get("value"), box.get("exc"), time.monotonic() - t0


def _result_within(job: "submitit.Job", bound_s: float = RESULT_BOUND_S, all_tasks: bool = False) -> Any:
    """job.result() (or job.results()) but failing, and cancelling the job, after bound_s."""
    finished, value, exc, _ = _call_within(job.results if all_tasks else job.result, bound_s)
    if not finished:
        job.cancel(check=False)
        pytest.fail(f"SLURM job {job.job_id} gave no result within {bound_s:.0f} s; stderr:\n{job.stderr()}")
    if exc is not None:
        raise exc
    return value


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.stdout.strip()


# --------------------------------------------------------------------------------------- tests --


def test_job_returns_value_and_sees_slurm_env(tmp_path: Path) -> None:
    job = _executor(tmp_path, gpus_per_node=1, tasks_per_node=1).submit(_square_with_env, 7)
    value, env = _result_within(job)
    assert value == 49
    assert env["SLURM_JOB_ID"] == job.job_id
    assert env["SUBMITIT_EXECUTOR"] == "slurm"
    # One fake GPU out of the node's N_FAKE_GPUS, as SLURM's gres plugin assigns it.
    assert env["CUDA_VISIBLE_DEVICES"] in {str(i) for i in range(N_FAKE_GPUS)}, env


def test_two_task_job_has_distinct_global_ranks(tmp_path: Path) -> None:
    ex = _executor(tmp_path, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1)
    job = ex.submit(_rank_info)
    infos = _result_within(job, all_tasks=True)
    assert len(infos) == 2
    assert sorted(i["global_rank"] for i in infos) == [0, 1]
    assert all(i["num_tasks"] == 2 for i in infos)
    assert {i["job_id"] for i in infos} == {job.job_id}
    assert len({i["pid"] for i in infos}) == 2  # two processes, not one task reported twice


def _assert_sacct_usable() -> None:
    """submitit learns about jobs that die without a result only from `sacct`; fail fast if it errors."""
    probe = subprocess.run(
        ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", "1"], capture_output=True, text=True, timeout=20
    )
    if probe.returncode != 0:
        pytest.fail(
            f"'sacct' ({shutil.which('sacct')}) fails: {probe.stderr.strip()!r}. Without slurmdbd, submitit needs "
            f"the 'sacct --completion' shim that {SETUP_SCRIPT} installs at /usr/local/bin/sacct, and "
            "/usr/local/bin must come before /usr/bin on PATH; otherwise a cancelled job's result() never returns."
        )


def test_cancelled_job_raises_within_bound(tmp_path: Path) -> None:
    _assert_sacct_usable()
    job = _executor(tmp_path, gpus_per_node=1, tasks_per_node=1).submit(_sleep_long)
    try:
        deadline = time.monotonic() + 60
        while _squeue_state(job.job_id) != "RUNNING":
            assert time.monotonic() < deadline, f"job {job.job_id} did not start within 60 s"
            time.sleep(0.2)
        job.cancel()
        finished, value, exc, seconds = _call_within(job.result, CANCEL_BOUND_S)
        # Without the sacct shim (no slurmdbd) submitit would never learn the state: it hangs.
        assert finished, (
            f"job.result() of cancelled job {job.job_id} still waiting after {CANCEL_BOUND_S:.0f} s; "
            f"is the sacct shim from {SETUP_SCRIPT} installed ('sacct' must accept --completion)?"
        )
        assert exc is not None, f"cancelled job returned {value!r} instead of raising"
        assert isinstance(exc, submitit.core.utils.UncompletedJobError), repr(exc)
        assert "CANCELLED" in str(exc)
        assert seconds < CANCEL_BOUND_S
    finally:
        job.cancel(check=False)
