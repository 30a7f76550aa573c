"""Reliability, round two (issue 22): each fault through the CLI gives one clear error (exit 2, no
traceback, naming the file, key or URI and the fix) or the announced fallback, and nothing already
written is lost. One section per class of the issue, each with neighbours of the reported case:

1. a resume whose checkpoint was written with another model or objective;
2. a tracking store that does not answer, or a file that is not an MLflow store (checked by the
   stage and by the workflow's onstart, in seconds); the study's parent run never replaced
   silently;
3. an unreadable file in an image-folder dataset (``data.on_bad_file: error|skip``, and the
   preflight's scan);
4. a YAML key given twice (study configs, stage configs, ``--set`` values, ``--configfile``);
5. ``simflow bench --checkpoint`` on a damaged file: the stages' message.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_stages import tiny_config

from simflow import tracking as T
from simflow.checkpoints import LATEST, RESUMABLE_KEYS, load_checkpoint
from simflow.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, timeout: float = 120,
        module: str = "simflow") -> subprocess.CompletedProcess:
    """``python3 -m <module> args`` in a fresh process (this checkout first on the path); the
    result carries ``seconds``, its wall-clock."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    proc.seconds = time.perf_counter() - t0
    return proc


def one_error(text: str, prefix: str = "simflow ") -> str:
    """The one error line of a CLI's stderr (and no traceback)."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith(prefix) and ": error: " in line]
    assert len(lines) == 1, text
    return lines[0]


def error_line(capsys) -> str:
    return one_error(capsys.readouterr().err)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# 1. resuming with a changed config
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A tiny run stopped (checkpointed) at step 4 of 12; tests copy it."""
    root = tmp_path_factory.mktemp("stopped")
    assert main(["train", "-c", str(tiny_config(root)), "--set", "train.max_steps_this_run=4"]) == 0
    assert load_checkpoint(root / "run" / "checkpoints" / LATEST)["step"] == 4
    return root


@pytest.fixture
def stopped(stopped_run, tmp_path) -> Path:
    root = tmp_path / "r"
    shutil.copytree(stopped_run, root)
    # the config names the original run folder: point it at the copy
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["run_dir"], cfg["results_root"] = str(root / "run"), str(root)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("change, listed", [
    (["flow.channels=64"], "flow.channels: 32 -> 64"),                     # the case: shapes
    (["model.l1_weight=0.5"], "model.l1_weight: 1.0 -> 0.5"),               # the objective, same shapes
    (["vae.posterior=learnable", "train.global_batch_size=8"],              # two keys at once
     "vae.posterior: 'fixed' -> 'learnable'; train.global_batch_size: 16 -> 8"),
    (["train.seed=3"], "train.seed: 0 -> 3"),                              # the data order
])
def test_a_resume_with_another_model_or_objective_is_one_error_and_deletes_nothing(stopped, capsys, change, listed):
    before = snapshot(stopped / "run")
    sets = [a for c in change for a in ("--set", c)]
    assert main(["train", "-c", str(stopped / "config.yaml"), *sets]) == 2
    err = error_line(capsys)
    ckpt = stopped / "run" / "checkpoints" / LATEST
    assert err.startswith(f"simflow train: error: checkpoint {ckpt} was written with another configuration")
    assert f"({listed})" in err
    assert f"mv {ckpt.parent} {ckpt.parent}.old" in err and "--set run_dir=" in err  # start afresh
    assert "--set train.resume_mismatch=allow" in err  # or resume anyway
    assert snapshot(stopped / "run") == before


def test_an_explicit_train_resume_path_is_checked_too(stopped, capsys):
    ckpt = stopped / "run" / "checkpoints" / LATEST
    other = tiny_config(stopped / "other")
    assert main(["train", "-c", str(other), "--set", f"train.resume={ckpt}", "--set", "flow.head_dim=8"]) == 2
    assert f"checkpoint {ckpt} was written with another configuration (flow.head_dim: 16 -> 8)" in error_line(capsys)


def test_the_keys_that_may_change_resume_exactly_there(stopped, capsys):
    """train.steps, the cadence, the learning rate, the micro-batch: a resume, no error."""
    assert main(["train", "-c", str(stopped / "config.yaml"), "--set", "train.steps=14", "--set",
                 "train.log_every=2", "--set", "train.lr=5e-4", "--set", "train.micro_batch_size=8",
                 "--set", "train.checkpoint_every=7"]) == 0
    assert f"resumed from {stopped / 'run' / 'checkpoints' / LATEST} at step 4" in capsys.readouterr().out
    assert load_checkpoint(stopped / "run" / "model.pt")["summary"]["steps"] == 14


def test_resume_mismatch_allow_resumes_with_a_warning_but_never_loads_other_shapes(stopped, capsys):
    cfg = str(stopped / "config.yaml")
    with pytest.warns(RuntimeWarning, match=r"train.resume_mismatch=allow: resuming .*model.l1_weight: 1.0 -> 0.5"):
        assert main(["train", "-c", cfg, "--set", "model.l1_weight=0.5", "--set", "train.resume_mismatch=allow",
                     "--set", "train.max_steps_this_run=2"]) == 0
    assert load_checkpoint(stopped / "run" / "checkpoints" / LATEST)["step"] == 6
    before = snapshot(stopped / "run" / "checkpoints")  # the opt-in run has rewritten its resolved config
    with pytest.warns(RuntimeWarning):
        assert main(["train", "-c", cfg, "--set", "flow.channels=64", "--set", "train.resume_mismatch=allow"]) == 2
    err = error_line(capsys)
    assert "holds weights of another architecture than this configuration builds" in err
    assert "flow.blocks.0.proj_in.weight: (32, 4) -> (64, 4)" in err and "no resume can load them" in err
    assert snapshot(stopped / "run" / "checkpoints") == before


def test_a_checkpoint_written_before_configs_were_stored_is_resumed_with_a_warning(stopped):
    ckpt = stopped / "run" / "checkpoints" / LATEST
    state = load_checkpoint(ckpt)
    del state["config"]
    torch.save(state, ckpt)
    with pytest.warns(RuntimeWarning, match=f"checkpoint {ckpt} carries no config"):
        assert main(["train", "-c", str(stopped / "config.yaml")]) == 0
    assert load_checkpoint(stopped / "run" / "model.pt")["summary"]["steps"] == 12


def test_a_key_added_after_the_checkpoint_counts_as_its_default(stopped):
    """A checkpoint of an older simflow lacks the keys added since: no false mismatch."""
    ckpt = stopped / "run" / "checkpoints" / LATEST
    state = load_checkpoint(ckpt)
    del state["config"]["model"]["l1_weight"]  # as if the key did not exist then
    torch.save(state, ckpt)
    assert main(["train", "-c", str(stopped / "config.yaml")]) == 0
    # ... and set to another value than its default now, it is a difference
    shutil.rmtree(stopped / "run")
    assert main(["train", "-c", str(stopped / "config.yaml"), "--set", "train.max_steps_this_run=4"]) == 0
    state = load_checkpoint(ckpt)
    del state["config"]["model"]["l1_weight"]
    torch.save(state, ckpt)
    assert main(["train", "-c", str(stopped / "config.yaml"), "--set", "model.l1_weight=2"]) == 2


def test_the_resume_mismatch_through_the_cli_has_no_traceback(stopped):
    proc = cli("train", "-c", str(stopped / "config.yaml"), "--set", "flow.layers_per_block=[2,1]")
    assert proc.returncode == 2
    assert "flow.layers_per_block: [1, 1] -> [2, 1]" in one_error(proc.stderr)


def test_config_readme_lists_every_key_that_may_change_on_resume():
    readme = (REPO / "config" / "README.md").read_text()
    section = readme.split("### Resuming", 1)[1].split("\n### ", 1)[0]
    missing = [k for k in RESUMABLE_KEYS if (f"`{k}*`" if k.endswith(".") else f"`{k}`") not in section]
    assert not missing, f"config/README.md, Resuming, does not list {missing}"


# ------------------------------------------------------------------------------------------
# 2. the tracking store
# ------------------------------------------------------------------------------------------
def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A loopback socket that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def http_server():
    """A loopback HTTP server answering every GET with the status in ``server.status``."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(self.server.status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def tracked(root: Path, uri: str) -> list[str]:
    return ["train", "-c", str(tiny_config(root)), "--set", "tracking.enabled=true",
            "--set", f"tracking.tracking_uri={uri}"]


def assert_no_work(root: Path) -> None:
    assert not (root / "run").exists() or not any((root / "run").rglob("*.pt"))


def test_a_server_that_accepts_but_never_answers_fails_in_seconds(tmp_path, silent_server):
    """The issue's hang (minutes in MLflow's retries): now STORE_PROBE_TRIES tries of
    STORE_PROBE_TIMEOUT_S, well under 30 s, naming the URI and the three ways out."""
    proc = cli(*tracked(tmp_path, silent_server))
    assert proc.returncode == 2 and proc.seconds < 30, (proc.returncode, proc.seconds)
    err = one_error(proc.stderr)
    assert f"MLflow tracking server {silent_server} does not answer" in err and "no answer within the timeout" in err
    assert "Start the server" in err and "tracking.tracking_uri" in err and "tracking.enabled=false" in err
    assert_no_work(tmp_path)


@pytest.mark.parametrize("scheme, path", [("http", ""), ("https", ""), ("http", "/mlflow/")])
def test_a_closed_port_fails_at_once(tmp_path, capsys, scheme, path):
    uri = f"{scheme}://127.0.0.1:{closed_port()}{path}"
    t0 = time.perf_counter()
    assert main(tracked(tmp_path, uri)) == 2
    assert time.perf_counter() - t0 < 30
    err = error_line(capsys)
    assert f"MLflow tracking server {uri} does not answer" in err and "Connection refused" in err
    assert_no_work(tmp_path)


def test_a_server_that_is_not_mlflow_is_named_and_an_answering_one_passes(http_server):
    uri = f"http://127.0.0.1:{http_server.server_address[1]}"
    T.check_tracking_store(uri)  # /health answers 200
    http_server.status = 404
    with pytest.raises(T.TrackingStoreError, match=rf"{uri} does not answer \({uri}/health: HTTP 404"):
        T.check_tracking_store(uri)
    http_server.status = 401  # there, behind authentication: MLflow's business
    T.check_tracking_store(uri)


def _other_sqlite(path: Path) -> None:
    import sqlite3
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE measurements (x REAL)")
    con.commit()
    con.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("name,value\na,1\n"), "is not an MLflow store (not a readable SQLite database: file is not a database)"),
    (_other_sqlite, "is an SQLite database but not an MLflow store (its tables: measurements;"),
    (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x07" * 200), "is not an MLflow store"),  # a damaged header
])
def test_a_file_that_is_not_an_mlflow_store_is_named_and_left_alone(tmp_path, capsys, make, message):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    make(db)
    before = snapshot(db.parent)
    assert main(tracked(tmp_path, f"sqlite:///{db}")) == 2
    err = error_line(capsys)
    assert f"tracking store sqlite:///{db}: {db} " in err and message in err
    assert "It is left as it is" in err and "tracking.enabled=false" in err
    assert snapshot(db.parent) == before  # not modified, migrated or replaced; no lock file either
    assert_no_work(tmp_path)


def test_stores_that_are_new_pass_the_check(tmp_path):
    T.check_tracking_store(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")  # MLflow creates it
    empty = tmp_path / "empty.db"
    empty.touch()
    T.check_tracking_store(f"sqlite:///{empty}")  # nothing to lose
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(T.TrackingStoreError, match="is not a file"):
        T.check_tracking_store(f"sqlite:///{tmp_path / 'dir.db'}")


def test_a_store_being_created_by_another_process_is_waited_for(tmp_path):
    """A half-created store (some of MLflow's tables) under the creator's lock is not called
    'not an MLflow store': the check waits for the lock, then sees the finished store."""
    import fcntl
    import sqlite3
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE experiments (x)")
    con.commit()
    con.close()
    lock = open(tmp_path / "mlflow.db.lock", "a+")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)

    def finish_creation():
        time.sleep(0.5)
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE alembic_version (v)")
        con.commit()
        con.close()
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    creator = threading.Thread(target=finish_creation)
    creator.start()
    T.check_tracking_store(f"sqlite:///{db}")
    creator.join()
    lock.close()


def smoke_study(tmp_path: Path, tracking: dict, **extra) -> Path:
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["results_root"] = str(tmp_path / "results")
    raw["tracking"] = tracking
    raw.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
@pytest.mark.parametrize("kind", ["closed port", "not a store"])
def test_the_workflow_checks_the_store_in_onstart_before_the_first_job(tmp_path, kind):
    if kind == "closed port":
        uri, expect = f"http://127.0.0.1:{closed_port()}", "does not answer"
    else:
        db = tmp_path / "notes.db"
        db.write_text("my notes\n")
        uri, expect = f"sqlite:///{db}", f"{db} is not an MLflow store"
    study = smoke_study(tmp_path, {"enabled": True, "tracking_uri": uri})
    proc = cli("-s", str(REPO / "Snakefile"), "-c1", "--configfile", str(study), cwd=tmp_path,
               module="snakemake", timeout=180)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = one_error(proc.stderr, prefix="simflow")
    assert uri in err and expect in err and "tracking.enabled=false" in err
    assert not (tmp_path / "results").exists()  # no job ran, not even mlflow_init


@pytest.fixture(scope="module")
def blank_store(tmp_path_factory) -> Path:
    pytest.importorskip("mlflow")
    db = tmp_path_factory.mktemp("blank-store") / "mlflow.db"
    T.init_tracking_store(f"sqlite:///{db}")
    return db


def init_study(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("init-study", "--study", "st", "--results-root", str(root / "results"), "--out",
               str(root / "results" / "st" / "mlflow_parent_run_id.txt"), *extra, module="simflow.study")


@pytest.mark.slow
def test_the_studys_parent_run_is_never_replaced_silently(tmp_path, blank_store):
    from mlflow import MlflowClient
    (tmp_path / "results").mkdir()
    shutil.copy(blank_store, tmp_path / "results" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    parent_file = tmp_path / "results" / "st" / "mlflow_parent_run_id.txt"
    assert init_study(tmp_path).returncode == 0
    first = parent_file.read_text().strip()
    client = MlflowClient(uri)

    # the file names a run the store holds deleted: an error, nothing created or rewritten
    client.delete_run(first)
    proc = init_study(tmp_path)
    assert proc.returncode == 2
    err = one_error(proc.stderr, prefix="python -m simflow.study")
    assert f"{parent_file} names MLflow run {first}, which is deleted in the tracking store {uri}" in err
    assert f"mlflow runs restore --run-id {first}" in err and f"delete {parent_file}" in err
    assert parent_file.read_text().strip() == first
    # ... or one the store does not have at all (another store's id)
    parent_file.write_text("0" * 32 + "\n")
    err = one_error(init_study(tmp_path).stderr, prefix="python -m simflow.study")
    assert f"names MLflow run {'0' * 32}, which is not in the tracking store {uri}" in err
    assert len(client.search_runs([client.get_experiment_by_name("st").experiment_id])) == 0  # none made

    # the file is missing (as after Snakemake re-made it): the last parent run, if live, is reused
    client.restore_run(first)
    parent_file.unlink()
    proc = init_study(tmp_path)
    assert proc.returncode == 0 and parent_file.read_text().strip() == first
    assert f"the study's parent run {first}" in proc.stderr and "reused" in proc.stderr

    # missing again, the store changed: a new parent there, and where the old one is is said
    parent_file.unlink()
    other = tmp_path / "other" / "mlflow.db"
    other.parent.mkdir()
    shutil.copy(blank_store, other)
    proc = init_study(tmp_path, "--tracking-uri", f"sqlite:///{other}")
    assert proc.returncode == 0
    new = parent_file.read_text().strip()
    assert new != first
    assert f"earlier parent run {first} is in store {uri}" in proc.stderr and "left as it is" in proc.stderr
    assert f"Created a new parent run {new} in sqlite:///{other}" in proc.stderr
    tag = MlflowClient(f"sqlite:///{other}").get_run(new).data.tags["simflow.previous_parent_run"]
    assert tag.startswith(f"{first} ({uri}")
    assert client.get_run(first).info.lifecycle_stage == "active"  # the old one untouched


# ------------------------------------------------------------------------------------------
# 3. unreadable data files
# ------------------------------------------------------------------------------------------
def _jpeg_bytes(rng) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> dict:
    """train/ and val/ with two classes of 12 JPEGs, one truncated JPEG and one file that is no
    image at all in train/."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(12):
                (root / split / cls / f"{i:02d}.jpg").write_bytes(_jpeg_bytes(rng))
    truncated = root / "train" / "a" / "03.jpg"
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    garbage = root / "train" / "b" / "05.jpg"
    garbage.write_bytes(b"<html>403 Forbidden</html>")
    cfg = tiny_config(tmp_path, data={"name": "imagefolder", "root": str(root), "image_size": 8},
                      train={"global_batch_size": 8, "steps": 6, "checkpoint_every": 3})
    return {"root": root, "config": cfg, "bad": [truncated, garbage], "run": tmp_path / "run"}


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named(image_folder, workers):
    """One truncated JPEG: the path, whether the DataLoader reads in this process or a worker's."""
    image_folder["bad"][1].write_bytes(_jpeg_bytes(np.random.default_rng(1)))  # only the truncated one left
    proc = cli("train", "-c", str(image_folder["config"]), "--set", f"data.num_workers={workers}")
    assert proc.returncode == 2
    err = one_error(proc.stderr)
    assert f"unreadable image file {image_folder['bad'][0]} (OSError: " in err
    assert "data.on_bad_file=skip" in err
    assert not (image_folder["run"] / "model.pt").exists()


def test_other_unreadable_files_are_named_too(image_folder, capsys):
    image_folder["bad"][0].write_bytes(_jpeg_bytes(np.random.default_rng(1)))  # repaired
    empty = image_folder["root"] / "train" / "a" / "07.jpg"
    empty.write_bytes(b"")
    assert main(["train", "-c", str(image_folder["config"])]) == 2
    err = error_line(capsys)
    assert f"unreadable image file {empty} (UnidentifiedImageError" in err or \
        f"unreadable image file {image_folder['bad'][1]} (UnidentifiedImageError" in err


def test_on_bad_file_skip_leaves_them_out_and_counts_them(image_folder, blank_store, capsys):
    from mlflow import MlflowClient
    store = image_folder["run"].parent / "store"
    store.mkdir()
    shutil.copy(blank_store, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    args = ["train", "-c", str(image_folder["config"]), "--set", "data.on_bad_file=skip",
            "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri={uri}"]
    assert main(args + ["--set", "train.max_steps_this_run=3"]) == 0
    assert main(args) == 0  # resumed: the count covers both runs, each file once
    captured = capsys.readouterr()
    for path in image_folder["bad"]:
        assert f"data.on_bad_file=skip: skipping unreadable {path} (" in captured.err
    run = image_folder["run"]
    assert "2 unreadable training file(s) left out" in captured.out
    listed = [line.split("\t")[0] for line in (run / "skipped_files.train.txt").read_text().splitlines()]
    assert sorted(set(listed)) == sorted(map(str, image_folder["bad"]))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["skipped_files"] == 2 and summary["steps"] == 6
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    history = MlflowClient(uri).get_metric_history(run_id, "data/skipped_files")
    assert history[-1].value == 2


@pytest.mark.slow
def test_the_preflight_names_unreadable_files_in_a_red_row(image_folder):
    proc = cli("preflight", "-c", str(image_folder["config"]), "--set", "preflight.steps=2",
               "--set", "launcher.gpus_per_node=0")
    assert proc.returncode == 0
    row = json.loads((image_folder["run"] / "preflight" / "preflight.json").read_text())
    checks = {c["check"]: c for c in row["checks"]}
    files = checks["data.train.files"]
    assert row["verdict"] == "fail" and files["status"] == "fail" and files["key"] == "data.on_bad_file / data.root"
    assert files["message"].startswith("2 of 24 image files of split 'train' are unreadable: ")
    assert all(str(p) in files["message"] for p in image_folder["bad"])
    assert checks["data.test.files"]["status"] == "ok"
    # with data.on_bad_file=skip the real run would leave them out: amber, still named
    proc = cli("preflight", "-c", str(image_folder["config"]), "--set", "preflight.steps=2",
               "--set", "launcher.gpus_per_node=0", "--set", "data.on_bad_file=skip")
    row = json.loads((image_folder["run"] / "preflight" / "preflight.json").read_text())
    files = {c["check"]: c for c in row["checks"]}["data.train.files"]
    assert files["status"] == "warn" and "leaves them out" in files["message"]


# ------------------------------------------------------------------------------------------
# 4. a key given twice
# ------------------------------------------------------------------------------------------
def test_a_study_config_with_a_key_twice_is_one_error_with_file_and_line(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: s\nseeds: [0]\nbase:\n  train: {steps: 3}\nseeds: [0, 1]\n")
    proc = cli("check", str(study), module="simflow.study")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"{study}:5:1: study config is not valid YAML (line 5, column 1): key "
                                   "'seeds' is given twice in the same mapping (first at line 2); remove one of them")


def test_a_variant_block_pasted_twice_is_refused(tmp_path):
    text = (REPO / "config" / "smoke.yaml").read_text()
    block = "variants:\n"
    assert block in text
    study = tmp_path / "study.yaml"
    study.write_text(text.replace(block, block + "  simflow: {group: latent, sigma: 0.5}\n", 1))
    proc = cli("check", str(study), module="simflow.study")
    assert proc.returncode == 2 and "key 'simflow' is given twice in the same mapping" in proc.stderr


def test_a_stage_config_or_a_set_value_with_a_key_twice_is_one_error(tmp_path, capsys):
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("train:\n  steps: 3\n  lr: 1.0e-3\n  steps: 30\n")
    assert main(["train", "-c", str(cfg)]) == 2
    assert error_line(capsys) == (f"simflow train: error: {cfg}:4:3: config file is not valid YAML (line 4, "
                                  "column 3): key 'steps' is given twice in the same mapping (first at line 2); "
                                  "remove one of them")
    assert main(["config", "resolve", "--set", "flow={channels: 64, head_dim: 16, channels: 32}"]) == 2
    assert "key 'channels' is given twice in the same mapping" in error_line(capsys)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from simflow.config import read_yaml
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {steps: 1, lr: 2}\nother:\n  <<: *b\n  steps: 5\n")
    assert read_yaml(path) == {"base": {"steps": 1, "lr": 2}, "other": {"steps": 5, "lr": 2}}


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
def test_a_configfile_with_a_key_twice_stops_the_workflow_naming_file_and_line(tmp_path):
    study = smoke_study(tmp_path, {"enabled": False})
    study.write_text(study.read_text() + "seeds:\n- 0\n- 1\n")  # a second seeds: at the end
    line = len(study.read_text().splitlines()) - 2
    proc = cli("-s", str(REPO / "Snakefile"), "-n", "--configfile", str(study), cwd=tmp_path,
               module="snakemake", timeout=180)
    assert proc.returncode != 0
    assert f"{study}:{line}:1: config file is not valid YAML" in proc.stdout + proc.stderr
    assert "key 'seeds' is given twice in the same mapping" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# 5. simflow bench --checkpoint
# ------------------------------------------------------------------------------------------
def test_bench_on_a_truncated_checkpoint_gives_the_stages_message(stopped, capsys):
    ckpt = stopped / "run" / "checkpoints" / LATEST
    data = ckpt.read_bytes()
    bad = stopped / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    assert main(["bench", "--parts", "train", "--checkpoint", str(bad)]) == 2
    err = error_line(capsys)
    assert f"--checkpoint: checkpoint {bad} is unreadable, truncated or corrupt" in err
    # the same words as a stage resuming from it
    assert main(["train", "-c", str(stopped / "config.yaml"), "--set", f"train.resume={bad}"]) == 2
    assert f"train.resume: checkpoint {bad} is unreadable, truncated or corrupt" in error_line(capsys)
