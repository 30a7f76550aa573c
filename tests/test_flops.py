"""Counted training FLOPs (simflow.flops) and the claims study's compute-matched budget."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simflow.config import deep_merge, load_config
from simflow.flops import matched_steps, pipeline_flops, step_flops, train_flops
from simflow.flow import TransformerFlow
from simflow.study import load_study, pipeline_configs

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16"]


def test_step_flops_scale_with_the_global_batch_and_count_what_each_mode_trains():
    e2e = load_config(overrides=TINY + ["train.global_batch_size=8"])
    assert step_flops(load_config(overrides=TINY + ["train.global_batch_size=16"])) == 2 * step_flops(e2e)
    frozen = load_config(overrides=TINY + ["train.global_batch_size=8", "model.mode=frozen_vae",
                                           "vae.posterior=learnable"])
    vae_only = step_flops(e2e, vae_only=True)
    # the frozen step runs the encoder forward only; the end-to-end step trains VAE and flow
    assert 0 < step_flops(frozen) < step_flops(e2e)
    assert 0 < vae_only < step_flops(e2e)
    # a Linear's forward + backward is 6·in·out FLOPs per token: the flow's share of the step
    pixel = load_config(overrides=TINY + ["train.global_batch_size=8", "model.mode=pixel"])
    assert step_flops(pixel) > 6 * 32 * 32 * 64 * 8  # at least one 32×32 map on 64 tokens of 8 images


@pytest.mark.slow
def test_the_claims_study_compute_matched_variant_costs_the_frozen_pipeline():
    raw = deep_merge(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()),
                     yaml.safe_load((REPO / "config" / "claims.yaml").read_text()))
    study = load_study(raw)
    configured = study.variants["simflow_compute_matched"].overrides["train"]["steps"]
    frozen = pipeline_flops(*pipeline_configs(study, "frozen_vae"))
    matched_cfg, no_pretrain = pipeline_configs(study, "simflow_compute_matched")
    assert no_pretrain is None
    assert configured == matched_steps(step_flops(matched_cfg), frozen["total"]), (
        "config/claims.yaml: simflow_compute_matched's train.steps no longer matches the frozen "
        "pipeline's FLOPs; set it to what `python -m simflow.study flops config/demo.yaml "
        "config/claims.yaml --match simflow_compute_matched=frozen_vae` prints")
    matched = pipeline_flops(matched_cfg)
    assert frozen["pretrain_vae"] > 0 and matched["pretrain_vae"] == 0
    assert matched["total"] == pytest.approx(frozen["total"], rel=1e-3)
    # equal updates is not equal compute: it costs more than the frozen pipeline
    assert pipeline_flops(*pipeline_configs(study, "simflow_equal_updates"))["total"] > 1.5 * frozen["total"]


def test_flops_command_rejects_an_unknown_variant_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "simflow.study", "flops", "config/smoke.yaml", "--match",
                           "simflow=nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--match simflow=nope: give VARIANT=REFERENCE, two of the study's variants" in proc.stderr


def test_train_flops_match_the_documented_formula():
    model = TransformerFlow(in_channels=2, img_size=4, patch_size=1, channels=32, layers_per_block=[1, 2],
                            num_classes=3, head_dim=16)
    w, d, t, layers, batch = 32, 2, 16, 3, 5
    per_token = 2 * (d * w + w * 2 * d) + layers * (3 * w * w + w * w + 2 * 4 * w * w)  # proj_in/out, attn, MLP
    per_sample = layers * 6 * w * w  # AdaLN modulation, once per sample
    flops = train_flops(model, batch)
    assert flops["per_token_params"] == per_token and flops["per_sample_params"] == per_sample
    assert flops["total_flops"] == 6 * per_token * batch * t + 6 * per_sample * batch + 6 * layers * w * batch * t * t


def test_training_counts_its_first_step_as_simflow_flops_does(tmp_path):
    """The train stage's summary carries the counted FLOPs of its own step (the real batch, the
    real model), the same number as the pipeline count at batch 2 scaled to the batch."""
    from simflow.distributed import DistEnv
    from simflow.train import train
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path}", "train.steps=3", "train.global_batch_size=8",
                                        "train.warmup_steps=0", "train.checkpoint_every=0",
                                        "tracking.enabled=false"])
    summary = train(cfg, DistEnv()).summary
    assert summary["step_flops"] == step_flops(cfg)
    assert summary["train_flops"] == 3 * summary["step_flops"]


def test_counting_the_first_step_leaves_the_training_bit_identical(tmp_path, monkeypatch):
    """The count is a pass of its own (FlopCounterMode dispatches some kernels differently): a run
    that counts and one that does not reach exactly the same weights."""
    import simflow.train as training
    from simflow.distributed import DistEnv

    def weights(folder: str) -> dict:
        cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / folder}", "train.steps=2",
                                            "train.global_batch_size=8", "train.warmup_steps=0",
                                            "train.checkpoint_every=0", "tracking.enabled=false"])
        return training.train(cfg, DistEnv()).model.state_dict()

    counted = weights("counted")
    monkeypatch.setattr(training, "counted_step_flops", lambda *args: 0.0)
    uncounted = weights("uncounted")
    assert all(torch.equal(counted[k], uncounted[k]) for k in counted)


def test_flops_command_says_which_match_it_could_not_count(tmp_path):
    """The smoke study's REPA target is written by an earlier stage: its row and any match on it
    say "not counted", with exit status 2 and no traceback. The results root is a fresh folder, as
    CI runs the smoke study in the checkout (which writes that target) before the tests."""
    overlay = tmp_path / "fresh_results.yaml"
    overlay.write_text(f"results_root: {tmp_path / 'results'}\n")
    proc = subprocess.run([sys.executable, "-m", "simflow.study", "flops", "config/smoke.yaml", str(overlay),
                           "--match", "simflow_repa=simflow"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "| simflow_repa |" in proc.stdout and "not counted" in proc.stdout
    assert "--match simflow_repa=simflow: not counted (above)" in proc.stderr
