"""The stage server (simflow.stage_server) through the real CLI: `python -m simflow <stage>` with
$SIMFLOW_STAGE_SERVER set hands the stage to a forked worker, which writes to the client's own
stdout/stderr, runs in its cwd with its environment, and whose exit (a code or a signal) the
client repeats; a client that dies takes its worker with it; the server ends with its owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_process import wait_until_gone
from simflow import study as sf
from simflow.stage_client import SERVER_ENV
from simflow.stage_server import StageServer

REPO = Path(__file__).resolve().parents[1]
STAGE_CONFIG = """\
study: t
variant: v
run_dir: run
results_root: results
data: {name: digits, image_size: 16}
eval: {classifier_steps: %d}
tracking: {enabled: %s}
"""


def start_server(log: Path, **kwargs) -> StageServer:
    """A server with the clients' module search path (``client`` sets PYTHONPATH to the repo):
    the server refuses a client whose sys.path differs from its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        return StageServer.start(log, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (its imports cost a few CPU-seconds), owned by this process."""
    log = tmp_path_factory.mktemp("server") / "stage-server.log"
    srv = start_server(log)
    yield srv, log
    assert srv.stop() == 0
    assert not os.path.exists(os.path.dirname(srv.socket_path))


def stage_dir(tmp_path: Path, steps: int = 2, tracking: bool = False) -> Path:
    (tmp_path / "stage.yaml").write_text(STAGE_CONFIG % (steps, json.dumps(tracking)))
    return tmp_path


def client(args: list[str], cwd: Path, socket_path: str | None, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    if socket_path is not None:
        environ[SERVER_ENV] = socket_path
    return subprocess.Popen([sys.executable, "-m", "simflow", *args, "--config", "stage.yaml"],
                            cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def worker_pid(log: Path, stage: str, seen: set[int], timeout_s: float = 120) -> int:
    """The pid of the next worker of ``stage`` that the server's log reports started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f"stage server: {stage} started (worker " in line:
                pid = int(line.rsplit("worker ", 1)[1].rstrip(")"))
                if pid not in seen:
                    seen.add(pid)
                    return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker of {stage} started; server log:\n{log.read_text()}")


SEEN: set[int] = set()  # workers already claimed by a test (the module's server serves them all)


def test_a_stage_runs_in_a_worker_with_the_clients_fds_cwd_and_exit_status(server, tmp_path):
    srv, log = server
    proc = client(["feature-extractor"], stage_dir(tmp_path), srv.socket_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    pid = worker_pid(log, "feature-extractor", SEEN)
    assert "stage server:" not in err  # not the in-process fallback
    # the run_dir is relative: the files land in the client's cwd
    assert (tmp_path / "run" / "classifier.pt").is_file()
    assert json.loads((tmp_path / "run" / "classifier.json").read_text())["steps"] == 2
    assert f"feature-extractor (worker {pid}) exit 0" in log.read_text()


def test_a_failing_stage_returns_its_status_and_reads_the_clients_environment(server, tmp_path):
    """A relative $MLFLOW_TRACKING_URI is made absolute against the cwd: the error names the
    client's folder and the file it put there (not an MLflow store), exit status 2."""
    srv, log = server
    cwd = stage_dir(tmp_path, tracking=True)
    (cwd / "bogus.db").write_text("not a database")
    proc = client(["latents"], cwd, srv.socket_path, MLFLOW_TRACKING_URI="sqlite:///bogus.db")
    out, err = proc.communicate(timeout=300)
    pid = worker_pid(log, "latents", SEEN)
    assert proc.returncode == 2, err
    assert err.startswith("simflow latents: error: ") and str(cwd / "bogus.db") in err, err
    assert "Traceback" not in err and out == ""
    assert f"latents (worker {pid}) exit 2" in log.read_text()


def test_a_worker_killed_by_a_signal_kills_its_client_with_it(server, tmp_path):
    srv, log = server
    proc = client(["feature-extractor"], stage_dir(tmp_path, steps=10**7), srv.socket_path)
    pid = worker_pid(log, "feature-extractor", SEEN)
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert f"(worker {pid}) killed by SIGKILL" in log.read_text()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_client_stops_its_worker(server, tmp_path, how):
    """SIGTERM to the client is forwarded to the worker (the client then dies by it too); a
    client killed outright closes its connection and the waiter stops the worker."""
    srv, log = server
    proc = client(["feature-extractor"], stage_dir(tmp_path, steps=10**7), srv.socket_path)
    pid = worker_pid(log, "feature-extractor", SEEN)
    proc.send_signal(getattr(signal, how))
    proc.communicate(timeout=60)
    assert proc.returncode == -getattr(signal, how)
    assert wait_until_gone(pid, 30), f"worker {pid} still runs after its client got {how}"
    assert f"(worker {pid}) killed by SIGTERM" in log.read_text()


def test_an_unreachable_server_is_one_line_and_the_stage_runs_in_its_own_process(tmp_path):
    missing = str(tmp_path / "no-server" / "socket")
    proc = client(["latents"], stage_dir(tmp_path), missing)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"simflow: stage server: cannot reach {missing} (FileNotFoundError")
    assert lines[0].endswith("running the stage in this process")
    assert lines[1:] == [f"simflow latents: error: {Path('run') / 'model.pt'} does not exist: run "
                         "`simflow train` for this variant first"]


def test_the_server_stops_when_its_owner_is_gone(tmp_path):
    owner = subprocess.Popen(["sleep", "600"])
    log = tmp_path / "stage-server.log"
    srv = start_server(log, owner_pid=owner.pid)
    deadline = time.monotonic() + 300
    while "stage server: ready" not in log.read_text():  # the owner is watched once imports end
        assert srv.proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    owner.kill()
    owner.wait()
    assert srv.proc.wait(timeout=30) == 0
    assert f"owner pid {owner.pid} is gone; stopping" in log.read_text()
    assert not os.path.exists(srv.socket_path)
    srv.stop()


def test_the_workflow_runs_a_server_only_for_local_stages_with_the_default_cli():
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    assert sf.stage_server_off(sf.load_study(smoke)) is None
    assert sf.stage_server_off(sf.load_study({**smoke, "stage_server": False})) == "stage_server: false"
    slurm = sf.load_study({**smoke, "launcher_backend": "slurm"})
    assert sf.stage_server_off(slurm) == "no stage runs with launcher.backend local"
    wrapped = sf.load_study({**smoke, "cli": "apptainer exec simflow.sif python3 -m simflow"})
    assert sf.stage_server_off(wrapped) == ("cli is 'apptainer exec simflow.sif python3 -m simflow', "
                                            "not 'python3 -m simflow'")
