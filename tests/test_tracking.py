"""Tests of simflow.tracking against a real MLflow SQLite store (no server, no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simflow import tracking as T

REPO = Path(__file__).resolve().parents[1]

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _python(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One initialised SQLite store with a study run, shared by the tests of this module
    (schema creation alone costs ~4 s)."""
    root = tmp_path_factory.mktemp("mlstore")
    uri = T.resolve_tracking_uri(None, root)
    T.init_tracking_store(uri)
    parent_file = root / "study" / "parent_run_id.txt"
    parent = T.init_study(uri, "simflow-test", "study-a", parent_file, tags={"dataset": "digits"})
    return {"root": root, "uri": uri, "parent_file": parent_file, "parent": parent}


def _variant(store: dict, name: str) -> tuple[str, Path]:
    run_file = store["root"] / name / "run_id.txt"
    rid = T.init_variant_run(store["uri"], "simflow-test", store["parent_file"], f"{name}_s0", run_file,
                             variant=name)
    return rid, run_file


# ---------------------------------------------------------------------------------------------
def test_flatten_nested_and_lists():
    flat = T.flatten({"model": {"depth": 8, "dims": [64, 128], "act": None}, "lr": 1e-4, "ok": True})
    assert flat == {"model.depth": 8, "model.dims": "[64, 128]", "model.act": "None", "lr": 1e-4, "ok": True}
    assert T.flatten({"a": {"b": {"c": 1}}}, prefix="cfg") == {"cfg.a.b.c": 1}


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert T.resolve_tracking_uri(None, "res") == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert T.resolve_tracking_uri(None, "res") == "http://127.0.0.1:5055"
    assert T.resolve_tracking_uri("", "res") == "http://127.0.0.1:5055"
    # the configured value wins, and a relative sqlite path is anchored at the cwd
    assert T.resolve_tracking_uri("sqlite:///db/x.db", "res") == f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    assert T.resolve_tracking_uri("sqlite:////abs/x.db", "res") == "sqlite:////abs/x.db"


def test_file_store_uri_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="sqlite"):
        T.init_tracking_store("file:./mlruns")


def test_study_and_variant_are_idempotent(store):
    again = T.init_study(store["uri"], "simflow-test", "study-a", store["parent_file"])
    assert again == store["parent"]
    rid, run_file = _variant(store, "idem")
    assert _variant(store, "idem")[0] == rid
    assert run_file.read_text().strip() == rid

    client = MlflowClient(store["uri"])
    run = client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == store["parent"]
    assert run.data.tags["variant"] == "idem"
    assert run.data.tags["study"] == "study-a"
    assert run.info.run_name == "idem_s0"  # the unit's name; the variant tag carries the variant
    parent = client.get_run(store["parent"])
    assert parent.data.tags["dataset"] == "digits"
    assert parent.info.status == "FINISHED"  # a container, not left RUNNING forever
    # artifacts stay with the results, not in ./mlruns of the cwd
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (store["root"] / "mlartifacts" / "simflow-test").as_uri()

    # a run id file naming a run the store does not have -> a new run, file rewritten
    run_file.write_text("0" * 32 + "\n")
    rid2 = _variant(store, "idem")[0]
    assert rid2 != rid and run_file.read_text().strip() == rid2


def test_variant_in_another_experiment_is_refused(store, tmp_path):
    with pytest.raises(ValueError, match="belongs to experiment 'simflow-test'"):
        T.init_variant_run(store["uri"], "other-exp", store["parent_file"], "v", tmp_path / "run_id.txt", variant="v")
    with pytest.raises(FileNotFoundError, match="init_study"):
        T.init_variant_run(store["uri"], "simflow-test", tmp_path / "missing.txt", "v", tmp_path / "r.txt",
                           variant="v")


def test_params_once_survive_a_second_stage_and_conflicts_are_named(store):
    rid, run_file = _variant(store, "params")
    cfg = {"model": {"depth": 4, "channels": [32, 64]}, "lr": 3e-4}
    with T.StageRun(store["uri"], run_file, "train") as tr:
        tr.log_params_once(cfg)
    # a requeued job / a later stage logs the same config again: no MLflow error
    with T.StageRun(store["uri"], run_file, "train") as tr:
        tr.log_params_once({**cfg, "extra": 1})
    run = MlflowClient(store["uri"]).get_run(rid)
    assert run.data.params == {"model.depth": "4", "model.channels": "[32, 64]", "lr": "0.0003", "extra": "1"}
    assert run.info.status == "FINISHED"
    with pytest.raises(ValueError, match=r"model\.depth: run has '4', now '5'"):
        with T.StageRun(store["uri"], run_file, "train") as tr:
            tr.log_params_once({"model": {"depth": 5}})
    assert MlflowClient(store["uri"]).get_run(rid).info.status == "FAILED"


def test_stage_tags_metrics_artifacts_and_nonfinite(store, tmp_path):
    rid, run_file = _variant(store, "metrics")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with T.StageRun(store["uri"], run_file, "sample") as tr:
        assert mlflow.active_run().info.run_id == rid  # fluent calls land in the run too
        with pytest.warns(RuntimeWarning) as caught:
            tr.log_metrics({"loss": 0.5, "bad": float("nan"), "inf": float("inf")}, step=3)
        texts = " ".join(str(w.message) for w in caught)
        assert "non-finite values of metric 'bad'" in texts and "metric 'inf'" in texts
        tr.log_metrics({"loss": 0.25}, step=4)
        tr.log_artifact(note, "notes")
        tr.log_dict({"a": 1}, "cfg.json")
    client = MlflowClient(store["uri"])
    hist = client.get_metric_history(rid, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(3, 0.5), (4, 0.25)]
    assert client.get_metric_history(rid, "bad") == [] and client.get_metric_history(rid, "inf") == []
    tags = client.get_run(rid).data.tags
    assert tags["stage"] == "sample" and "host.sample" in tags and "host" in tags
    art_root = store["root"] / "mlartifacts" / "simflow-test" / rid / "artifacts"
    assert (art_root / "notes" / "note.txt").read_text() == "hello"
    assert (art_root / "cfg.json").is_file()


def test_exception_marks_run_failed_and_propagates(store):
    rid, run_file = _variant(store, "fails")
    with pytest.raises(ZeroDivisionError):
        with T.StageRun(store["uri"], run_file, "train"):
            _ = 1 / 0
    assert MlflowClient(store["uri"]).get_run(rid).info.status == "FAILED"
    assert mlflow.active_run() is None
    # reattaching after the failure (a retry) reopens and finishes the same run
    with T.StageRun(store["uri"], run_file, "train"):
        pass
    assert MlflowClient(store["uri"]).get_run(rid).info.status == "FINISHED"


def test_disabled_stage_run_writes_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'never' / 'mlflow.db'}"
    old = signal.getsignal(signal.SIGTERM)
    with T.StageRun(uri, tmp_path / "no_such_run_id.txt", "train", enabled=False) as tr:
        assert signal.getsignal(signal.SIGTERM) is old
        tr.log_params_once({"a": 1})
        tr.log_metrics({"loss": 1.0}, step=0)
        tr.log_dict({"a": 1}, "x.json")
        tr.log_artifact(tmp_path / "missing.txt")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_stage_marks_run_killed(store):
    rid, run_file = _variant(store, "sigterm")
    proc = _python(
        """
        import sys, time
        from pathlib import Path
        from simflow.tracking import StageRun
        with StageRun(sys.argv[1], Path(sys.argv[2]), "train") as tr:
            tr.log_metrics({"loss": 1.0}, step=0)
            print("ready", flush=True)
            time.sleep(60)
        """,
        store["uri"], str(run_file),
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc == 128 + signal.SIGTERM
    run = MlflowClient(store["uri"]).get_run(rid)
    assert run.info.status == "KILLED"
    assert run.data.metrics["loss"] == 1.0


@pytest.mark.slow  # 8 interpreters importing MLflow on 2 cores: 20-40 s
def test_concurrent_stages_lose_no_metrics(store):
    """8 processes, each in its own child run of one initialised store, log at once."""
    n_proc, n_steps = 8, 25
    runs = [_variant(store, f"conc{i}") for i in range(n_proc)]
    script = """
        import sys
        from pathlib import Path
        from simflow.tracking import StageRun
        with StageRun(sys.argv[1], Path(sys.argv[2]), "train") as tr:
            tr.log_params_once({"worker": sys.argv[2]})
            for s in range(int(sys.argv[3])):
                tr.log_metrics({"loss": 1.0 / (s + 1), "step_sq": float(s * s)}, step=s)
        """
    t0 = time.time()
    procs = [_python(script, store["uri"], str(f), str(n_steps)) for _, f in runs]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(store["uri"])
    for rid, _ in runs:
        run = client.get_run(rid)
        assert run.info.status == "FINISHED"
        for key in ("loss", "step_sq"):
            hist = client.get_metric_history(rid, key)
            assert sorted(m.step for m in hist) == list(range(n_steps)), key
    print(f"8 concurrent stage processes: {time.time() - t0:.1f} s")


@pytest.mark.slow  # 4 interpreters importing MLflow + one schema creation: 15-40 s
def test_parallel_first_init_of_a_fresh_store_does_not_corrupt(tmp_path):
    """4 processes initialise the same fresh SQLite file at once (the lock serialises them),
    then each creates and finishes a run in it. Without the lock 3 of 4 processes die with
    `duplicate column name: step` / `table _alembic_tmp_... already exists`."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    script = """
        import sys
        from simflow.tracking import init_tracking_store
        from mlflow import MlflowClient
        init_tracking_store(sys.argv[1])
        c = MlflowClient(sys.argv[1])
        run = c.create_run("0", run_name="w" + sys.argv[2])
        c.log_metric(run.info.run_id, "x", 1.0)
        c.set_terminated(run.info.run_id)
        """
    procs = [_python(script, uri, str(i)) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    runs = MlflowClient(uri).search_runs(["0"])
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1", "w2", "w3"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_stage_run_leaves_mlflow_tracking_uri_env_as_it_found_it(store, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a stage must not leak it into the
    next stage of the same process (resolve_tracking_uri honours the variable)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, rid_file = _variant(store, "env-leak")
    with T.StageRun(store["uri"], rid_file, "train"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    with T.StageRun(store["uri"], rid_file, "sample"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"


# ---------------------------------------------------------------------------------------------
# experiment kind, the parent run's lifetime and outputs, system metrics
# ---------------------------------------------------------------------------------------------
def test_experiment_is_tagged_as_model_training(store):
    """MLflow 3's UI opens an experiment by its kind: the runs table for model training."""
    exp = MlflowClient(store["uri"]).get_experiment_by_name("simflow-test")
    assert exp.tags[T.EXPERIMENT_KIND_TAG] == T.TRAINING_EXPERIMENT_KIND == "custom_model_development"


def test_an_experiment_made_before_the_tag_gets_it_and_a_set_kind_is_kept(store):
    client = MlflowClient(store["uri"])
    old = client.create_experiment("made-by-an-older-simflow")
    T.init_study(store["uri"], "made-by-an-older-simflow", "old", store["root"] / "old" / "parent.txt")
    assert client.get_experiment(old).tags[T.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = client.create_experiment("kind-chosen-by-a-user", tags={T.EXPERIMENT_KIND_TAG: "finetuning"})
    T.init_study(store["uri"], "kind-chosen-by-a-user", "mine", store["root"] / "mine" / "parent.txt")
    assert client.get_experiment(mine).tags[T.EXPERIMENT_KIND_TAG] == "finetuning"


def test_parent_run_spans_the_study_and_ends_with_its_status(store, tmp_path):
    client = MlflowClient(store["uri"])
    parent_file = tmp_path / "parent.txt"
    rid = T.init_study(store["uri"], "simflow-test", "span", parent_file)
    start = client.get_run(rid).info.start_time
    assert T.set_run_status(store["uri"], parent_file, "RUNNING") == rid
    info = client.get_run(rid).info
    assert info.status == "RUNNING" and info.start_time == start
    T.set_run_status(store["uri"], parent_file, "FAILED")
    info = client.get_run(rid).info
    assert info.status == "FAILED" and info.end_time >= start
    T.set_run_status(store["uri"], parent_file, "RUNNING")  # the next invocation of the study
    T.set_run_status(store["uri"], parent_file, "FINISHED")
    info = client.get_run(rid).info
    assert info.status == "FINISHED" and info.start_time == start
    # no run (tracking disabled: a marker file; or no file yet): nothing to do
    marker = tmp_path / "disabled.txt"
    marker.write_text("tracking disabled\n")
    assert T.set_run_status(store["uri"], marker, "RUNNING") is None
    assert T.set_run_status(store["uri"], tmp_path / "missing.txt", "RUNNING") is None
    with pytest.raises(ValueError, match="run status"):
        T.set_run_status(store["uri"], parent_file, "DONE")


def test_log_run_outputs_puts_files_metrics_tags_and_a_description_on_the_run(store, tmp_path):
    client = MlflowClient(store["uri"])
    parent_file = tmp_path / "parent.txt"
    rid = T.init_study(store["uri"], "simflow-test", "outputs", parent_file)
    (tmp_path / "summary.md").write_text("# Study\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "fig.png").write_bytes(b"\x89PNG")
    T.log_run_outputs(store["uri"], parent_file,
                      artifacts={"": [tmp_path / "summary.md"], "figures": [tmp_path / "fig.png",
                                                                          tmp_path / "absent.png"]},
                      metrics={"gfid/simflow": 12.5, "gfid/broken": float("nan")},
                      tags={"claim.smoothness": "reproduced"}, description="# Study\nsummary")
    run = client.get_run(rid)
    assert run.data.metrics == {"gfid/simflow": 12.5}
    assert run.data.tags["claim.smoothness"] == "reproduced"
    assert run.data.tags["mlflow.note.content"] == "# Study\nsummary"
    top = {a.path for a in client.list_artifacts(rid)}
    assert top == {"summary.md", "figures"}
    assert [a.path for a in client.list_artifacts(rid, "figures")] == ["figures/fig.png"]
    # logging again replaces the copies (one file per name) and the values
    T.log_run_outputs(store["uri"], parent_file, artifacts={"": [tmp_path / "summary.md"]},
                      metrics={"gfid/simflow": 11.0})
    assert client.get_run(rid).data.metrics["gfid/simflow"] == 11.0
    assert T.log_run_outputs(store["uri"], tmp_path / "missing.txt", metrics={"x": 1.0}) is None


def test_training_stage_logs_system_metrics(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    rid, run_file = _variant(store, "sysmetrics")
    with T.StageRun(store["uri"], run_file, "train", system_metrics=True):
        time.sleep(3.5)
    keys = set(MlflowClient(store["uri"]).get_run(rid).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    # other stages, and an explicit opt-out, log none
    rid2, run_file2 = _variant(store, "no-sysmetrics")
    with T.StageRun(store["uri"], run_file2, "sample"):
        time.sleep(1.5)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with T.StageRun(store["uri"], run_file2, "train", system_metrics=True):
        time.sleep(1.5)
    assert not [k for k in MlflowClient(store["uri"]).get_run(rid2).data.metrics if k.startswith("system/")]


def test_runs_page_url_opens_the_model_training_view(store, tmp_path, capsys):
    exp_id = MlflowClient(store["uri"]).get_experiment_by_name("simflow-test").experiment_id
    url = T.runs_page_url(store["uri"], "simflow-test", port=5055)
    assert url == f"http://127.0.0.1:5055/#/experiments/{exp_id}?workflowType=machine_learning"
    assert T.runs_page_url(store["uri"], "no-such-experiment").endswith("/#/experiments?workflowType=machine_learning")
    missing = T.resolve_tracking_uri(None, tmp_path / "none")
    assert T.runs_page_url(missing, "x").endswith("#/experiments?workflowType=machine_learning")
    assert not (tmp_path / "none").exists()  # no empty store made just to look
    from simflow.cli import main

    assert main(["ui", "--study", "simflow-test", "--results-root", str(store["root"]), "--print-url"]) == 0
    assert f"#/experiments/{exp_id}?workflowType=machine_learning" in capsys.readouterr().out
