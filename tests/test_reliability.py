"""Reliability (issue 13): bad inputs and injected faults give one clear error or a safe
fallback, and nothing is lost. One section per case of the issue:

1. a stage run by hand never rewrites a study's MLflow run-id files; a study whose ids are not
   in the store in use is one error naming both;
2. an explicit ``data.root`` is used or refused, never silently replaced;
3. checkpoints survive a corrupt write and an unreadable ``latest.pt`` falls back to the previous
   checkpoint;
4. nonsense values are refused by the typed config, the study check and ``snakemake -n``;
5. a full disk is one clear message, rc 2, no temporary files left;
6. the NaN guard names a checkpoint whose loss was sane, and resuming from it works;
7. YAML syntax errors name the file, line and column, rc 2;

plus the trials that already passed (kill or terminate and rerun: an exact resume).
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from test_stages import assert_same_weights, final_weights, tiny_config

from simflow import io as sio
from simflow import study as S
from simflow import tracking as T
from simflow.cli import main
from simflow.config import ConfigError, load_config
from simflow.contracts import CONFIG_FILE, RUN_ID_FILE
from simflow.distributed import DistEnv
from simflow.checkpoints import LAST_SANE, LATEST, PREVIOUS, NonFiniteLossError, load_checkpoint
from simflow.train import train

REPO = Path(__file__).resolve().parents[1]


def temp_files(root: Path) -> list[Path]:
    """What simflow.io leaves behind when a write fails (it must leave nothing)."""
    return sorted(p for p in root.rglob("*") if ".tmp" in p.name)


def step_of(path: Path) -> int:
    return load_checkpoint(path)["step"]


def error_line(capsys) -> str:
    """The CLI's error: exactly one line starting with 'simflow <stage>: error:'."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("simflow ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory) -> dict:
    """The final weights of the tiny run trained without interruption."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["train", "-c", str(tiny_config(root))]) == 0
    return final_weights(root / "run")


# ------------------------------------------------------------------------------------------
# 1. MLflow bookkeeping belongs to the study
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blank_store(tmp_path_factory) -> Path:
    """An initialised, empty SQLite store, copied for each store a test needs (creating the
    schema costs seconds; copying it nothing)."""
    pytest.importorskip("mlflow")
    db = tmp_path_factory.mktemp("blank-store") / "mlflow.db"
    T.init_tracking_store(f"sqlite:///{db}")
    return db


def new_store(blank: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(blank, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def tracked_study(tmp_path, monkeypatch, blank_store) -> dict:
    """The smoke study with MLflow on: store, parent run and the simflow/s0 unit set up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["results_root"] = str(tmp_path / "results")
    raw["tracking"] = {"enabled": True}
    study = S.load_study(raw)
    uri = new_store(blank_store, tmp_path / "results")
    parent_file = Path(study.parent_run_id_file)
    parent = S.init_study_tracking(study.name, study.results_root, parent_file)
    unit = S.variant_unit("simflow", 0)
    unit_dir = Path(study.unit_dir(unit))
    files = (unit_dir / CONFIG_FILE, unit_dir / RUN_ID_FILE, parent_file)
    S.setup_unit(study.units[unit], *files, run_name=S.unit_run_name(unit),
                 tags=S.unit_tags(study, unit))
    return {"study": study, "uri": uri, "parent": parent, "parent_file": parent_file,
            "unit": unit, "files": files, "root": tmp_path}


def _untouched(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_stage_run_by_hand_with_another_store_never_rewrites_the_study(tracked_study, blank_store,
                                                                          capsys, monkeypatch):
    """The issue's reproduction: the study's parent-run file is left alone and the study's own
    set-up of a changed variant still works afterwards."""
    st, root = tracked_study, tracked_study["root"]
    before = _untouched(st["parent_file"])
    other = new_store(blank_store, root / "x")
    hand = ["train", "--config", str(st["files"][0]), "--set", f"run_dir={root / 'x'}",
            "--set", "tracking.run_id_file=null", "--set", "train.steps=20"]
    assert main(hand + ["--set", f"tracking.tracking_uri={other}"]) == 2
    err = error_line(capsys)
    assert f"{st['parent_file']} names MLflow run {st['parent']}" in err
    assert f"tracking store in use ({other})" in err
    assert "not part of study 'smoke'" in err and "--set study=<another name>" in err
    # the same through $MLFLOW_TRACKING_URI in the shell
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert main(hand) == 2
    assert f"$MLFLOW_TRACKING_URI is set to '{other}'" in error_line(capsys)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _untouched(st["parent_file"]) == before
    assert not (root / "x" / "model.pt").exists() and not (root / "x" / "mlflow_run_id.txt").exists()

    # the study carries on: one variant changed, its unit is set up again in the study's store
    changed = copy.deepcopy(st["study"].units[st["unit"]])
    changed.setdefault("train", {})["steps"] = 9
    st["files"][0].unlink()
    run_id = S.setup_unit(changed, *st["files"], run_name="simflow_s0")
    from mlflow import MlflowClient
    assert MlflowClient(st["uri"]).get_run(run_id).data.tags["mlflow.parentRunId"] == st["parent"]


def test_a_study_whose_ids_are_not_in_the_store_in_use_is_one_error_naming_both(tracked_study, blank_store,
                                                                                 monkeypatch):
    st = tracked_study
    other = new_store(blank_store, st["root"] / "elsewhere")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)  # e.g. left set in the shell
    before = _untouched(st["parent_file"])
    st["files"][1].unlink()  # a changed variant: setup_unit makes a new child run
    with pytest.raises(T.RunNotInStoreError) as info:
        S.setup_unit(st["study"].units[st["unit"]], *st["files"], run_name="simflow_s0")
    msg = str(info.value)
    assert f"{st['parent_file']} names MLflow run {st['parent']}" in msg and other in msg
    assert "$MLFLOW_TRACKING_URI is set to" in msg and f"delete {st['parent_file']}" in msg
    assert _untouched(st["parent_file"]) == before
    # a stage attached to a run of the study's store, but reading another store: the same error
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    ids = st["root"] / "ids.txt"
    ids.write_text(st["parent"] + "\n")
    with T.StageRun(st["uri"], ids, "check"):
        pass
    with pytest.raises(T.RunNotInStoreError, match=re.escape(f"{ids} names MLflow run {st['parent']}")):
        with T.StageRun(other, ids, "check"):
            pass


def test_a_stage_run_by_hand_files_its_run_under_the_study_or_its_own_parent(tracked_study):
    from simflow.runner import variant_run_id_file
    st = tracked_study
    before = _untouched(st["parent_file"])
    cfg = load_config(st["files"][0], [f"run_dir={st['root'] / 'hand'}", "tracking.run_id_file=null"])
    run_file = variant_run_id_file(cfg)  # the study's store: a child of the study's parent run
    from mlflow import MlflowClient
    client = MlflowClient(st["uri"])
    assert client.get_run(run_file.read_text().strip()).data.tags["mlflow.parentRunId"] == st["parent"]
    assert _untouched(st["parent_file"]) == before
    # a study nobody set up: the hand stage keeps its parent run in its own run_dir
    lone = load_config(st["files"][0], [f"run_dir={st['root'] / 'lone'}", "tracking.run_id_file=null",
                                        "study=scratch"])
    variant_run_id_file(lone)
    assert (st["root"] / "lone" / "mlflow_parent_run_id.txt").is_file()
    assert not (st["root"] / "results" / "scratch").exists()


# ------------------------------------------------------------------------------------------
# 2. data.root is used or refused
# ------------------------------------------------------------------------------------------
def test_an_explicit_data_root_without_the_data_is_refused_not_replaced(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tmp_path, data={"name": "fashion_mnist", "root": str(empty), "image_size": 8})
    assert main(["train", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err  # the paths tried, one a line
    assert err.startswith("simflow train: error: Fashion-MNIST train split not found in "
                          f"data.root={empty}: need train-images-idx3-ubyte")
    assert f"  - {empty}\n  - {empty / 'FashionMNIST' / 'raw'}\n" in err
    assert "never replaced by another copy" in err
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained"


# ------------------------------------------------------------------------------------------
# 3. checkpoints
# ------------------------------------------------------------------------------------------
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_weights, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg), "--set", "train.max_steps_this_run=8"]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    latest, previous = ckpts / LATEST, ckpts / PREVIOUS
    assert (step_of(latest), step_of(previous)) == (8, 4)
    os.truncate(latest, latest.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match=re.escape(f"checkpoint {latest} is unreadable") + ".*"
                      + re.escape(f"Resuming from {previous} (step 4) instead")):
        assert main(["train", "-c", str(cfg)]) == 0
    assert_same_weights(reference_weights, final_weights(tmp_path / "run"))  # nothing lost
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, PREVIOUS]

    # a final model that cannot be read is named, with what to do
    model = tmp_path / "run" / "model.pt"
    os.truncate(model, 100)
    capsys.readouterr()
    assert main(["sample", "-c", str(cfg)]) == 2
    err = error_line(capsys)
    assert f"checkpoint {model} is unreadable" in err and "rerun `simflow train`" in err


def test_unreadable_checkpoints_are_one_error_naming_each(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg), "--set", "train.max_steps_this_run=8"]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / LATEST).write_bytes(b"not a checkpoint")
    (ckpts / PREVIOUS).write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "-c", str(cfg)]) == 2
    err = error_line(capsys)
    assert f"checkpoint {ckpts / LATEST} is unreadable" in err
    assert f"checkpoint {ckpts / PREVIOUS} is unreadable" in err and "train.resume=never" in err
    assert main(["train", "-c", str(cfg), "--set", f"train.resume={ckpts / PREVIOUS}"]) == 2
    assert f"train.resume: checkpoint {ckpts / PREVIOUS} is unreadable" in error_line(capsys)


def test_a_latest_checkpoint_damaged_after_it_was_written_never_costs_the_previous_one(tmp_path):
    """Before removing previous.pt to make room, the keeper checks that latest.pt still reads."""
    from simflow.checkpoints import CheckpointKeeper
    folder = tmp_path / "checkpoints"
    keeper = CheckpointKeeper(folder)
    for step in (4, 8):
        keeper.observe(1.0)
        keeper.close_window(step)
        keeper.write({"step": step})
    os.truncate(folder / LATEST, 10)  # the step-8 file, damaged on disk
    keeper.observe(1.0)
    keeper.close_window(12)
    with pytest.warns(RuntimeWarning, match=re.escape(f"{folder / LATEST} is not a complete checkpoint")):
        keeper.write({"step": 12})
    assert (step_of(folder / LATEST), step_of(folder / PREVIOUS)) == (12, 4)
    assert temp_files(tmp_path) == []


def test_a_corrupt_checkpoint_write_never_replaces_the_good_one(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def corrupting_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == 8:  # flip one byte of what was written
            data = bytearray(Path(f).read_bytes())
            data[len(data) // 2] ^= 0xFF
            Path(f).write_bytes(bytes(data))

    monkeypatch.setattr(torch, "save", corrupting_save)
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg)]) == 2
    latest = tmp_path / "run" / "checkpoints" / LATEST
    assert f"writing {latest} produced an unreadable file" in error_line(capsys)
    assert step_of(latest) == 4 and temp_files(tmp_path) == []


# ------------------------------------------------------------------------------------------
# 4. ranges
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.steps=-1", "train.steps: -1 is out of range; it must be ≥ 1"),
    ("train.global_batch_size=0", "train.global_batch_size: 0 is out of range; it must be ≥ 1"),
    ("sample.num_samples=0", "sample.num_samples: 0 is out of range; it must be ≥ 1"),
    ("sample.batch_size=0", "sample.batch_size: 0 is out of range; it must be ≥ 1"),
    ("vae.fixed_std=0", "vae.fixed_std: 0.0 is out of range; it must be > 0"),
    ("train.log_every=0", "train.log_every: 0 is out of range; it must be ≥ 1"),
    ("train.betas=[0.9,1.5]", "train.betas[1]: 1.5 is out of range; it must be ≥ 0 and < 1"),
    ("flow.layers_per_block=[]", "flow.layers_per_block: [] has 0 entries; expected at least 1"),
    ("data.image_size=9", "data.image_size=9 is not divisible by the VAE's downsampling factor 2"),
    ("flow.patch_size=3", "the latent size 4 (data.image_size=8 / the VAE's factor 2) is not "
                          "divisible by flow.patch_size=3"),
    ("flow.head_dim=24", "flow.channels=32 is not divisible by flow.head_dim=24"),
])
def test_nonsense_values_are_refused_before_anything_runs(tmp_path, capsys, override, message):
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg), "--set", override]) == 2
    assert error_line(capsys).startswith(f"simflow train: error: {message}")
    assert not (tmp_path / "run").exists(), "refused before any file was written"


def test_pixel_mode_needs_an_image_size_divisible_by_the_patch():
    with pytest.raises(ConfigError, match=r"data.image_size=8 is not divisible by flow.patch_size=3"):
        load_config(None, ["model.mode=pixel", "data.image_size=8", "flow.patch_size=3"])
    load_config(None, ["model.mode=pixel", "data.image_size=8", "flow.patch_size=4"])


def _smoke_with(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["results_root"] = str(tmp_path / "results")
    mutate(raw)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["variants"]["simflow"].update(overrides={"train": {"steps": -1}}),
     "variants.simflow.overrides: train.steps: -1 is out of range; it must be ≥ 1"),
    (lambda r: r["base"]["sample"].update(num_samples=0),
     "base: sample.num_samples: 0 is out of range; it must be ≥ 1"),
    (lambda r: r["variants"]["simflow"].update(overrides={"flow": {"patch_size": 3}}),
     "variant 'simflow' (seed 0): the merged stage config is invalid: the latent size 4 "
     "(data.image_size=16 / the VAE's factor 4) is not divisible by flow.patch_size=3"),
])
def test_the_study_check_refuses_nonsense_naming_variant_and_key(tmp_path, capsys, mutate, message):
    path = _smoke_with(tmp_path, mutate)
    assert S.main(["check", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
def test_snakemake_dry_run_refuses_a_nonsense_value_before_any_job(tmp_path):
    from test_workflow import snakemake
    path = _smoke_with(tmp_path, lambda r: r["variants"]["simflow_repa"].update(
        overrides={"train": {"global_batch_size": 0}}))
    proc = snakemake("-n", "--configfile", str(path), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert ("variants.simflow_repa.overrides: train.global_batch_size: 0 is out of range"
            in proc.stdout + proc.stderr)
    assert not (tmp_path / "results").exists()


def test_the_schema_carries_the_ranges():
    jsonschema = pytest.importorskip("jsonschema")
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["base"]["train"]["steps"] = -1
    with pytest.raises(jsonschema.ValidationError, match="minimum of 1"):
        jsonschema.validate(raw, S.study_schema())


# ------------------------------------------------------------------------------------------
# 5. full disk
# ------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "result.json"
    sio.atomic_write(target, lambda tmp: tmp.write_text("old"))

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sio.atomic_write(target, broken)
    assert target.read_text() == "old" and temp_files(tmp_path) == []


def test_no_space_left_is_one_clear_error_naming_the_file(tmp_path):
    target = tmp_path / "config.resolved.yaml"

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(sio.DiskFullError) as info:
        sio.atomic_write(target, full)
    assert str(info.value).startswith("no space left on /") and f"while writing {target}" in str(info.value)
    assert info.value.errno == errno.ENOSPC and temp_files(tmp_path) == []


def test_a_short_torch_write_on_a_full_filesystem_counts_as_no_space(tmp_path, monkeypatch):
    """torch.save says only 'unexpected pos' when the disk fills up."""
    monkeypatch.setattr(sio, "_free_bytes", lambda folder: 0)

    def short(tmp: Path) -> None:
        tmp.write_bytes(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(sio.DiskFullError, match=r"^no space left on .* while writing .*latest\.pt"):
        sio.atomic_write(tmp_path / "latest.pt", short)
    assert temp_files(tmp_path) == []


def test_a_full_disk_while_checkpointing_is_rc2_and_the_rerun_loses_nothing(
        tmp_path, monkeypatch, capsys, reference_weights):
    disk = {"full": False}
    real_save, real_free = torch.save, sio._free_bytes

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 8 and not disk.get("freed"):
            Path(f).write_bytes(b"PK\x03\x04")  # a few bytes, then the disk is full
            disk["full"] = True
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(sio, "_free_bytes", lambda folder: 0 if disk["full"] else real_free(folder))
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg)]) == 2
    latest = tmp_path / "run" / "checkpoints" / LATEST
    err = error_line(capsys)
    assert err.startswith("simflow train: error: no space left on /") and f"while writing {latest}" in err
    assert temp_files(tmp_path) == [] and step_of(latest) == 4
    disk.update(full=False, freed=True)  # space freed: the same command resumes at step 4
    assert main(["train", "-c", str(cfg)]) == 0
    assert_same_weights(reference_weights, final_weights(tmp_path / "run"))


def test_a_full_disk_while_writing_the_resolved_config_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                 capsys):
    real_write = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if "config.resolved.yaml" in self.name:
            real_write(self, "", *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg)]) == 2
    assert f"while writing {tmp_path / 'run' / 'config.resolved.yaml'}" in error_line(capsys)
    assert temp_files(tmp_path) == [] and not (tmp_path / "run" / "config.resolved.yaml").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of a given size (root only, where mounting is allowed), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def make(size_bytes: int) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_a_really_full_filesystem(tmp_path, small_filesystem, capsys):
    """Room for one checkpoint and a half: the second write runs out of space."""
    probe = tiny_config(tmp_path / "probe")
    assert main(["train", "-c", str(probe), "--set", "train.max_steps_this_run=4"]) == 0
    size = (tmp_path / "probe" / "run" / "checkpoints" / LATEST).stat().st_size
    mnt = small_filesystem(int(size * 1.5) + 64 * 1024)
    cfg = tiny_config(tmp_path / "full")
    raw = yaml.safe_load(cfg.read_text())
    raw["run_dir"] = str(mnt / "run")
    cfg.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["train", "-c", str(cfg)]) == 2
    latest = mnt / "run" / "checkpoints" / LATEST
    err = error_line(capsys)
    assert err.startswith(f"simflow train: error: no space left on {mnt} while writing {latest}")
    assert temp_files(mnt) == [] and step_of(latest) == 4
    assert main(["train", "-c", str(cfg)]) == 2  # the rerun: the same message, still nothing left over
    assert f"while writing {latest}" in error_line(capsys) and temp_files(mnt) == []


# ------------------------------------------------------------------------------------------
# 6. the NaN guard stands behind a sane checkpoint
# ------------------------------------------------------------------------------------------
def test_the_nan_guard_names_the_last_checkpoint_with_a_sane_loss_and_resuming_from_it_works(
        tmp_path, monkeypatch, capsys):
    from simflow import model as model_module
    original = model_module.SimFlowModel.training_losses

    def diverging(self, images, labels, step, *args):
        out = original(self, images, labels, step, *args)
        factor = 1.0 if step < 4 else 1e11 if step < 9 else float("nan")
        out.total = out.total * factor
        out.terms["total"] = out.total.detach()
        return out

    monkeypatch.setattr(model_module.SimFlowModel, "training_losses", diverging)
    path = tiny_config(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    with pytest.raises(NonFiniteLossError) as info:
        train(load_config(path), DistEnv())
    msg = str(info.value)
    sane = load_checkpoint(ckpts / LAST_SANE)
    latest = load_checkpoint(ckpts / LATEST)
    assert sane["step"] == 4 and sane["loss"]["sane"] and 0 < sane["loss"]["mean"] < 10
    assert latest["step"] == 8 and not latest["loss"]["sane"] and latest["loss"]["max"] > 1e9
    assert (f"at step 9 of v; the last checkpoint with a sane loss is {ckpts / LAST_SANE} (step 4, "
            f"mean loss {sane['loss']['mean']:.4g})") in msg
    assert f"{ckpts / LATEST} (step 8, worst loss" in msg and "had already left the sane range" in msg
    advice = re.search(r"--set (train\.resume=\S+) --set train\.lr=<lower>", msg)
    assert advice and advice.group(1) == f"train.resume={ckpts / LAST_SANE}"

    monkeypatch.undo()  # the advice: resume from it with a lower learning rate
    assert main(["train", "-c", str(path), "--set", advice.group(1), "--set", "train.lr=5e-4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "model.pt")["summary"]["final_loss"] < 10
    assert not (ckpts / LAST_SANE).exists(), "a newer sane checkpoint supersedes it"


# ------------------------------------------------------------------------------------------
# 7. YAML syntax errors
# ------------------------------------------------------------------------------------------
BROKEN = "study: t\ntrain:\n  steps: 3\n   lr: 1e-3\n"  # line 4: one space too many


def test_a_config_file_that_does_not_parse_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["train", "-c", str(path)]) == 2
    assert error_line(capsys) == (f"simflow train: error: {path}:4:6: config file is not valid YAML "
                                  "(line 4, column 6): mapping values are not allowed here")
    assert S.main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:4:6: study config is not valid YAML")
    assert main(["train", "-c", str(tiny_config(tmp_path)), "--set", "train.betas=[0.9"]) == 2
    assert "override 'train.betas=[0.9': the value is not valid YAML" in error_line(capsys)


# ------------------------------------------------------------------------------------------
# trials that already passed: killed or terminated, the same command resumes exactly
# ------------------------------------------------------------------------------------------
KILL_AFTER_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from simflow import checkpoints as T
    from simflow.cli import main
    write = T.CheckpointKeeper.write
    def write_then_signal(self, state):
        path = write(self, state)
        if state["step"] == int(sys.argv[1]):
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        return path
    T.CheckpointKeeper.write = write_then_signal
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("signame, returncode", [("SIGKILL", -9), ("SIGTERM", 143)])
def test_killed_or_terminated_training_reruns_only_the_unfinished_steps(
        tmp_path, blank_store, reference_weights, signame, returncode):
    """The signal arrives right after the step-8 checkpoint (no timing involved): the rerun of
    the same command resumes there and ends with exactly the uninterrupted run's weights."""
    new_store(blank_store, tmp_path)  # tracking on: SIGTERM ends the MLflow run as KILLED
    cfg = tiny_config(tmp_path, tracking={"enabled": True})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["train", "-c", str(cfg)]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, "8", signame, *cmd],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert killed.returncode == returncode, killed.stderr[-2000:]
    assert step_of(tmp_path / "run" / "checkpoints" / LATEST) == 8
    rerun = subprocess.run([sys.executable, "-m", "simflow", *cmd], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / LATEST} at step 8" in rerun.stdout
    assert_same_weights(reference_weights, final_weights(tmp_path / "run"))
    assert temp_files(tmp_path / "run") == []


def test_bench_checkpoint_that_is_missing_or_not_torch_is_one_line(tmp_path, capsys):
    """`simflow bench --checkpoint`: a wrong path or a file that is not a checkpoint is one error line
    naming the file (rc 2), not a traceback from torch.load."""
    missing = tmp_path / "nope.pt"
    assert main(["bench", "--parts", "train", "--checkpoint", str(missing)]) == 2
    assert f"--checkpoint {missing}: no such file" in error_line(capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    assert main(["bench", "--parts", "train", "--checkpoint", str(garbage)]) == 2
    assert f"--checkpoint: checkpoint {garbage} is unreadable, truncated or corrupt" in error_line(capsys)
