"""Tests of simflow.launch: config validation, the in-process and submitit-local backends,
failure/cancel handling, signals, the distributed env, Call, and the sbatch script."""

from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import launch_jobs
import pytest
import submitit

from helpers_process import wait_until_gone
from local_slurm import skip_without_slurm
from simflow.config import ConfigError
from simflow.launch import (
    Call,
    LauncherConfig,
    LaunchError,
    build_executor,
    export_distributed_env,
    launch,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def job_env(monkeypatch, tmp_path):
    """Make simflow and tests/launch_jobs importable in submitit's job interpreter."""
    parts = [str(REPO), str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(parts))
    for var in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _local_cfg(tmp_path: Path, **kw) -> LauncherConfig:
    return LauncherConfig(backend="submitit-local", gpus_per_node=0, timeout_min=5,
                          log_dir=str(tmp_path / "logs"), **kw)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_from_dict_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        LauncherConfig.from_dict({"backend": "slurm", "partiton": "gpu"})
    msg = str(e.value)
    assert "'launcher.partiton'" in msg and "partition" in msg.split("valid keys of launcher:")[1]
    assert "timeout_min" in msg and "extra_sbatch" in msg


def test_from_dict_builds_a_full_config():
    cfg = LauncherConfig.from_dict({
        "backend": "slurm", "partition": "gpu", "gpus_per_node": 4, "timeout_min": 240,
        "extra_sbatch": {"mail-type": "END"}, "setup": ["module load cuda"], "mem_gb": 64,
    })
    assert cfg.partition == "gpu" and cfg.effective_tasks_per_node() == 4
    assert cfg.extra_sbatch == {"mail-type": "END"} and cfg.setup == ["module load cuda"]
    assert LauncherConfig.from_dict(None).backend == "local"
    empty = LauncherConfig.from_dict({"extra_sbatch": None, "setup": None})  # `key:` with no value in YAML
    assert empty.extra_sbatch == {} and empty.setup == []


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"backend": "debug"}, r"launcher.backend: 'debug' is not one of \['local', 'submitit-local', 'slurm'\]"),
        ({"timeout_min": 1}, r"timeout_min=1 is too short for signal_delay_s=120.*timeout_min >= 3"),
        ({"timeout_min": 2}, "too short"),
        ({"timeout_min": "60"}, "launcher.timeout_min"),
        ({"gpus_per_node": -1}, "launcher.gpus_per_node: -1 is out of range; it must be ≥ 0"),
        ({"nodes": 0}, "launcher.nodes: 0 is out of range; it must be ≥ 1"),
        ({"mem_gb": 0}, "launcher.mem_gb: 0.0 is out of range; it must be > 0"),
        ({"extra_sbatch": {"partition": "x"}}, "use launcher.partition instead"),
        ({"extra_sbatch": {"--gpus-per-node": 2}}, "use launcher.gpus_per_node instead"),
        ({"setup": "module load cuda"}, "launcher.setup"),
        ({"backend": "submitit-local", "nodes": 2}, "set nodes=1"),
    ],
)
def test_bad_config_is_one_clear_error(kw, match):
    """The one validation: each key's option (type, range), then the checks across keys."""
    with pytest.raises(ConfigError, match=match):
        LauncherConfig.from_dict(kw)


def test_short_timeout_is_fine_with_a_short_signal_delay():
    assert LauncherConfig(timeout_min=1, signal_delay_s=20).timeout_min == 1


def test_tasks_per_node_is_derived_from_gpus_unless_given():
    assert LauncherConfig(gpus_per_node=8).effective_tasks_per_node() == 8
    assert LauncherConfig(gpus_per_node=0).effective_tasks_per_node() == 1
    assert LauncherConfig(gpus_per_node=4, tasks_per_node=1).effective_tasks_per_node() == 1


def test_slurm_sbatch_script_carries_the_config(tmp_path, monkeypatch):
    # submitit only checks that srun is on PATH to build a SLURM executor; nothing is submitted.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = LauncherConfig(
        backend="slurm", partition="gpu", account="proj", qos="high", constraint="a100",
        nodes=2, gpus_per_node=4, cpus_per_task=6, mem_gb=64, timeout_min=240,
        signal_delay_s=180, extra_sbatch={"mail-type": "END"}, setup=["module load cuda/12"],
        log_dir=str(tmp_path / "logs"),
    )
    ex = build_executor(cfg, "train base/1")
    assert ex.cluster == "slurm"
    script = ex._executor._make_submission_file_text("python -m x", "uid")  # private, stable since 1.2
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --mem=64GB",
                 "#SBATCH --time=240", "#SBATCH --signal=USR2@180", "#SBATCH --mail-type=END",
                 "#SBATCH --job-name='train base/1'", "module load cuda/12"]:
        assert line in script.splitlines(), (line, script)
    assert f"{tmp_path / 'logs' / 'train_base_1'}/%j/%j_0_log.out" in script
    assert ex._executor.max_num_timeout == 20


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def test_local_backend_returns_and_propagates():
    cfg = LauncherConfig(backend="local")
    assert launch(functools.partial(launch_jobs.add, 2, 3), cfg, "add") == 5
    with pytest.raises(RuntimeError, match="in-process failure"):
        launch(functools.partial(launch_jobs.fail, "in-process failure"), cfg, "fail")


def test_submitit_local_returns_the_value(job_env, capsys):
    seen = []
    out = launch(functools.partial(launch_jobs.add, 40, 2), _local_cfg(job_env), "add",
                 on_submit=seen.append, poll_s=0.2)
    assert out == 42
    (job,) = seen
    assert isinstance(job, submitit.LocalJob)
    err = capsys.readouterr().err
    assert f"submitted submitit-local job {job.job_id}" in err
    assert str(job.paths.stdout) in err and str(job.paths.stderr) in err
    assert job.paths.stdout.parent.parent == job_env / "logs" / "add"


def test_failing_job_raises_launch_error_with_log_path_and_remote_error(job_env):
    seen = []
    with pytest.raises(LaunchError) as e:
        launch(functools.partial(launch_jobs.fail, "remote-boom-1234"), _local_cfg(job_env), "fail",
               on_submit=seen.append, poll_s=0.2)
    msg = str(e.value)
    assert "RuntimeError: remote-boom-1234" in msg
    assert str(seen[0].paths.stderr) in msg
    assert "last 30 lines of" in msg


def test_cancelled_job_raises_without_hanging(job_env):
    pid_file = job_env / "task.pid"

    def cancel_soon(job):
        def run():
            time.sleep(2.0)
            job.cancel(check=False)
        threading.Thread(target=run, daemon=True).start()

    t0 = time.time()
    with pytest.raises(LaunchError, match="without a result"):
        launch(functools.partial(launch_jobs.sleep_then, 60, "never", str(pid_file)),
               _local_cfg(job_env), "sleeper", on_submit=cancel_soon, poll_s=0.2)
    assert time.time() - t0 < 20
    pid = int(pid_file.read_text())
    _assert_dead(pid)


def _assert_dead(pid: int, within_s: float = 5.0) -> None:
    if not wait_until_gone(pid, within_s):
        pytest.fail(f"process {pid} still alive")


def test_sigterm_to_the_launcher_cancels_the_job(job_env):
    pid_file = job_env / "task.pid"
    script = textwrap.dedent(
        """
        import functools, sys
        import launch_jobs
        from simflow.launch import LauncherConfig, launch
        cfg = LauncherConfig(backend="submitit-local", gpus_per_node=0, timeout_min=5, log_dir=sys.argv[1])
        launch(functools.partial(launch_jobs.sleep_then, 60, 1, sys.argv[2]), cfg, "sleeper",
               on_submit=lambda job: print("submitted", job.job_id, flush=True), poll_s=0.2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(job_env / "logs"), str(pid_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["submitted"], proc.stderr.read()
    controller_pid = int(line[1])  # submitit-local's job id is its controller's pid
    deadline = time.time() + 20
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    task_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert f"got SIGTERM, cancelling job {controller_pid}" in proc.stderr.read()
    _assert_dead(task_pid)
    _assert_dead(controller_pid)


def test_two_cpu_tasks_get_a_torch_distributed_env(job_env):
    out_dir = job_env / "ranks"
    out_dir.mkdir()
    cfg = _local_cfg(job_env, tasks_per_node=2)
    env0 = launch(functools.partial(launch_jobs.distributed_probe, str(out_dir)), cfg, "ddp", poll_s=0.2)
    assert env0["RANK"] == "0"  # launch returns task 0's result
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"} and {r["LOCAL_WORLD_SIZE"] for r in ranks} == {"2"}
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"]


def test_submitting_from_inside_a_slurm_job_hides_its_variables(job_env, monkeypatch):
    # inherited SLURM_* variables break a nested job's allocation; SLURM_CONF must survive
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/site.conf")
    names = ["SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_CONF", "SUBMITIT_EXECUTOR"]
    seen = launch(functools.partial(launch_jobs.env_probe, names), _local_cfg(job_env), "nested", poll_s=0.2)
    assert seen == {"SLURM_JOB_ID": None, "SLURM_CPUS_PER_TASK": None,
                    "SLURM_CONF": "/etc/slurm/site.conf", "SUBMITIT_EXECUTOR": "local"}
    assert os.environ["SLURM_JOB_ID"] == "777" and os.environ["SLURM_CPUS_PER_TASK"] == "3"


def test_no_distributed_env_outside_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert export_distributed_env() is None


# ---------------------------------------------------------------------------------------------
# Call
# ---------------------------------------------------------------------------------------------
def test_call_pickles_checkpoints_and_imports_its_function_only_when_run(monkeypatch):
    job = Call("simflow_fake_stages:run_stage", "train", "config/study.yaml", ["variant=base", "train.steps=10"])
    assert pickle.loads(pickle.dumps(job)) == job  # the module is not imported to pickle the call

    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function == job and delayed.function is not job
    assert delayed.args == () and delayed.kwargs == {}

    calls = []
    fake = types.ModuleType("simflow_fake_stages")
    fake.run_stage = lambda stage, config_path, overrides: calls.append((stage, config_path, overrides)) or "ok"
    monkeypatch.setitem(sys.modules, "simflow_fake_stages", fake)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert job() == "ok"
    assert calls == [("train", "config/study.yaml", ["variant=base", "train.steps=10"])]

    with pytest.raises(ValueError, match="'package.module:function'"):
        Call("simflow.runner.run_stage")


def test_launching_a_stage_call_runs_the_stage_in_the_job(job_env):
    """A Call through submitit-local (the form the runner submits a stage in): the job imports
    the function by name and returns its result."""
    cfg = _local_cfg(job_env)
    assert launch(Call("launch_jobs:add", 1, 2), cfg, "call-add", poll_s=0.2) == 3


# ---------------------------------------------------------------------------------------------
# a real SLURM (tests/slurm/setup_local_slurm.sh), skipped when none answers
# ---------------------------------------------------------------------------------------------
@pytest.mark.slurm
@skip_without_slurm
def test_slurm_job_returns_and_failure_names_logs(job_env):
    cfg = LauncherConfig(backend="slurm", partition="debug", gpus_per_node=0, cpus_per_task=1,
                         mem_gb=0.5, timeout_min=5, log_dir=str(job_env / "logs"))
    assert launch(functools.partial(launch_jobs.add, 1, 2), cfg, "slurm-add", poll_s=0.5) == 3
    with pytest.raises(LaunchError, match="RuntimeError: slurm-boom"):
        launch(functools.partial(launch_jobs.fail, "slurm-boom"), cfg, "slurm-fail", poll_s=0.5)
