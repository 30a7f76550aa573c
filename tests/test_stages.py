"""Stages through the CLI: resume equivalence, NaN guard, error messages, sampling invariance."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simflow.cli import main
from simflow.config import load_config
from simflow.distributed import DistEnv
from simflow.stages import rank_slice, sample_noise_and_labels
from simflow.checkpoints import NonFiniteLossError
from simflow.train import train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **sections) -> Path:
    cfg = {
        "study": "t", "variant": "v", "run_dir": str(tmp_path / "run"), "results_root": str(tmp_path),
        "data": {"name": "digits", "image_size": 8},
        "vae": {"channel_mult": [1, 2], "base_channels": 8, "latent_channels": 4},
        "flow": {"channels": 32, "layers_per_block": [1, 1], "head_dim": 16},
        "train": {"steps": 12, "global_batch_size": 16, "log_every": 4, "checkpoint_every": 4,
                  "warmup_steps": 2, "deterministic": True},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_stopped_and_resumed_training_reaches_the_same_weights(tmp_path):
    ref = tiny_config(tmp_path / "ref")
    assert main(["train", "-c", str(ref)]) == 0
    resumed = tiny_config(tmp_path / "res")
    assert main(["train", "-c", str(resumed), "--set", "train.max_steps_this_run=5"]) == 0
    run_dir = tmp_path / "res" / "run"
    assert not (run_dir / "model.pt").exists(), "an unfinished run must not write its final output"
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["step"] == 5
    assert main(["train", "-c", str(resumed)]) == 0
    assert_same_weights(final_weights(tmp_path / "ref" / "run"), final_weights(run_dir))


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL mid-run (after a checkpoint), restart with the same command: identical weights."""
    steps = ["train.steps=40", "train.checkpoint_every=5"]
    ref = tiny_config(tmp_path / "ref")
    assert main(["train", "-c", str(ref)] + [a for s in steps for a in ("--set", s)]) == 0
    cfg = tiny_config(tmp_path / "kill")
    cmd = [sys.executable, "-m", "simflow", "train", "-c", str(cfg)] + [a for s in steps for a in ("--set", s)]
    ckpt = tmp_path / "kill" / "run" / "checkpoints" / "latest.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 40, "the process must have been killed mid-run"
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert_same_weights(final_weights(tmp_path / "ref" / "run"), final_weights(tmp_path / "kill" / "run"))


def test_non_finite_loss_stops_with_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(tiny_config(tmp_path))
    from simflow import model as model_module
    original = model_module.SimFlowModel.training_losses

    def poisoned(self, images, labels, step, *args):
        out = original(self, images, labels, step, *args)
        if step == 6:
            out.total = out.total * float("nan")
            out.terms["total"] = out.total.detach()
        return out

    monkeypatch.setattr(model_module.SimFlowModel, "training_losses", poisoned)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    with pytest.raises(NonFiniteLossError, match=r"step 6 .*latest\.pt"):
        train(cfg, DistEnv())
    assert torch.load(latest, weights_only=False)["step"] == 4, "the last good checkpoint is untouched"


def test_bad_config_key_and_value_give_one_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["train", "-c", str(cfg), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in err and "valid keys of train" in err
    assert main(["train", "-c", str(cfg), "--set", "vae.posterior=wide"]) == 2
    assert "vae.posterior: 'wide' is not one of" in capsys.readouterr().err


def test_missing_dataset_names_the_paths_tried(tmp_path, capsys):
    cfg = tiny_config(tmp_path, data={"name": "imagefolder", "root": str(tmp_path / "nowhere"), "image_size": 8})
    assert main(["train", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err


def test_downstream_stage_without_training_says_what_to_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["sample", "-c", str(cfg)]) == 2
    assert "run `simflow train`" in capsys.readouterr().err


def test_sample_noise_does_not_depend_on_the_number_of_ranks(tmp_path):
    cfg = load_config(tiny_config(tmp_path))
    from simflow.model import build_model
    model = build_model(cfg, 1, 10)
    whole, labels = sample_noise_and_labels(cfg, model, range(10))
    parts = [sample_noise_and_labels(cfg, model, rank_slice(10, DistEnv(rank=r, world_size=3)))
             for r in range(3)]
    assert torch.equal(whole, torch.cat([p[0] for p in parts]))
    assert torch.equal(labels, torch.cat([p[1] for p in parts]))
    assert labels.tolist() == list(range(10))  # balanced labels


@pytest.mark.slow
def test_stages_run_end_to_end_on_digits_through_submitit(tmp_path):
    """train locally, then sample + nll as submitit-local jobs, with MLflow tracking on."""
    cfg = tiny_config(tmp_path, tracking={"enabled": True},
                      sample={"num_samples": 20, "batch_size": 10},
                      eval={"num_nll": 50})
    assert main(["train", "-c", str(cfg)]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for stage in ("sample", "nll"):
        subprocess.run([sys.executable, "-m", "simflow", stage, "-c", str(cfg), "--set",
                        "launcher.backend=submitit-local", "--set", f"launcher.log_dir={tmp_path / 'logs'}",
                        "--set", "launcher.gpus_per_node=0", "--set", "launcher.timeout_min=5"],
                       cwd=tmp_path, env=env, check=True, capture_output=True)
    samples = np.load(tmp_path / "run" / "samples.npz")["arr_0"]
    assert samples.shape == (20, 8, 8, 1) and samples.dtype == np.uint8
    nll = json.loads((tmp_path / "run" / "metrics" / "nll.json").read_text())
    # the latent flow's Bayes classifier scores the posterior means of the test images
    assert nll["bayes_input"] == "posterior mean" and 0.0 <= nll["bayes_accuracy"] <= 1.0
    assert nll["protocol"] == "latent_posterior_samples"
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "eval/nll_bpd" in run.data.metrics and "train/total" in run.data.metrics
    assert run.data.metrics["eval/bayes_accuracy"] == pytest.approx(nll["bayes_accuracy"])
    assert any(k.startswith("job_id.sample") for k in run.data.tags)


def test_fid_floor_scores_real_test_images_at_the_samples_count(tmp_path, capsys):
    """feature-extractor -> fid-ref (statistics + per-image features) -> fid-floor: real test
    images, as many as sample.num_samples, against the reference; FID above 0 (its small-sample
    bias), KID from the stored features."""
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, sample={"num_samples": 40},
                      eval={"feature_extractor": "simflow-classifier", "classifier_path": str(run / "classifier.pt"),
                            "reference_stats": str(run / "reference_stats.npz"), "classifier_steps": 20,
                            "num_reference": 300})
    for stage in ("feature-extractor", "fid-ref", "fid-floor"):
        assert main([stage, "-c", str(cfg)]) == 0, stage
    with np.load(run / "reference_stats.npz") as npz:
        assert npz["features"].shape[0] == 300
    floor = json.loads((run / "metrics" / "real_floor.json").read_text())
    assert floor["num_images"] == 40 and floor["split"] == "test" and floor["num_reference_images"] == 300
    assert floor["fid"] > 0 and np.isfinite(floor["kid_mean"]) and floor["kid_std"] >= 0
    # more real images than the test split holds: one clear error, nothing written
    (run / "metrics" / "real_floor.json").unlink()
    assert main(["fid-floor", "-c", str(cfg), "--set", "sample.num_samples=100000"]) != 0
    assert "test split has" in capsys.readouterr().err and not (run / "metrics" / "real_floor.json").exists()
