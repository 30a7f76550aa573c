"""Tests of simflow.study: loading and validating study configs, per-unit stage configs, the
launcher precedence, the unit set-up (config file, checkpoints, MLflow run) and the schema."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simflow import study as S
from simflow.config import Config, LauncherSection, deep_merge, describe, load_config, to_dict
from simflow.contracts import STAGES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {name: REPO / "config" / f"{name}.yaml" for name in ("config", "demo", "smoke")}


def _raw(name: str = "smoke") -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def _tiny(**extra) -> dict:
    """A small valid study: two variants, one frozen, tracking off, results under ``res``."""
    raw = {
        "study": "tiny",
        "results_root": "res",
        "seeds": [0, 3],
        "base": {"data": {"name": "digits", "image_size": 16},
                 "eval": {"feature_extractor": "simflow-classifier"}},
        "pretrain_vae": {"vae": {"posterior": "learnable"}, "train": {"steps": 5}},
        "variants": {
            "simflow": {"group": "latent", "sigma": 0.5},
            "frozen": {"group": "latent", "overrides": {"vae": {"posterior": "learnable"},
                                                        "model": {"mode": "frozen_vae"}}},
        },
        "tracking": {"enabled": False},
    }
    raw.update(extra)
    return raw


# ------------------------------------------------------------------------------------------
# the shipped configs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load_and_every_unit_is_a_valid_stage_config(name):
    study = S.load_study(CONFIGS[name])
    assert study.variants and study.units
    for unit, cfg in study.units.items():
        full = S.resolved_config(cfg)
        assert full.run_dir == f"{study.dir}/{unit}"
        assert full.study == study.name


def test_paper_and_demo_study_have_the_same_variants():
    paper, demo = S.load_study(CONFIGS["config"]), S.load_study(CONFIGS["demo"])
    # the demo leaves the equal-updates variant to the claims study and the rate-weight sweep
    # (which justifies the default both use) to its overlay, both outside its 15-minute budget
    assert [v for v in paper.variants if v != "simflow_equal_updates"] == list(demo.variants)
    sweep = S.load_study(deep_merge(yaml.safe_load(CONFIGS["demo"].read_text()),
                                    yaml.safe_load((CONFIGS["demo"].parent / "rate_sweep.yaml").read_text())))
    assert sweep.name == "demo" and list(sweep.variants)[:len(demo.variants)] == list(demo.variants)
    rate_variants = {v: S.resolved_config(sweep.units[f"{v}/s0"]).model.decoder_scale
                     for v, spec in sweep.variants.items() if spec.group == "rate_sweep"}
    assert rate_variants == {"simflow_b0.03": 0.03, "simflow_b0.3": 0.3, "simflow_b1": 1.0, "simflow_b4": 4.0}
    claims = S.load_study(deep_merge(yaml.safe_load(CONFIGS["demo"].read_text()),
                                     yaml.safe_load((CONFIGS["demo"].parent / "claims.yaml").read_text())))
    assert list(claims.variants) == ["frozen_vae", "e2e_learnable", "simflow", "simflow_repa",
                                     "simflow_equal_updates", "simflow_compute_matched"]
    assert claims.seeds == [0, 1, 2, 3, 4]
    # equal updates: the frozen pipeline's VAE pre-training + flow steps
    assert S.resolved_config(claims.units["simflow_equal_updates/s4"]).train.steps == (
        S.resolved_config(claims.units["_shared/pretrain_vae/s4"]).train.steps
        + S.resolved_config(claims.units["frozen_vae/s4"]).train.steps)
    assert {S.resolved_config(u).model.decoder_scale for u in paper.units.values()
            if S.resolved_config(u).model.mode == "end_to_end"} == {"calibrated"}
    expected = {"frozen_vae", "frozen_vae_noise", "frozen_encoder_noise", "e2e_learnable",
                "e2e_layernorm", "simflow", "simflow_sigma0.1", "simflow_sigma0.25",
                "simflow_sigma0.75", "simflow_sigma1.0", "simflow_equal_updates", "simflow_repa",
                    "tarflow_pixel",
                "tarflow_pixel_uncond"}
    assert set(paper.variants) == expected
    sweep = {v.sigma for v in paper.variants.values() if v.group == "sigma_sweep"}
    assert sweep == {0.1, 0.25, 0.75, 1.0}


def _overlay(*names: str) -> dict:
    raw = yaml.safe_load(CONFIGS["demo"].read_text())
    for name in names:
        raw = deep_merge(raw, yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()))
    return raw


def test_tarflow_overlay_is_tarflows_recipe_beside_latent_flows_at_the_same_updates():
    study = S.load_study(_overlay("tarflow"))
    assert list(study.variants) == ["frozen_vae", "simflow", "tarflow_pixel", "tarflow_pixel_uniform"]
    units = {v: S.resolved_config(study.units[f"{v}/s0"]) for v in study.variants}
    pixel, uniform = units["tarflow_pixel"], units["tarflow_pixel_uniform"]
    for cfg in (pixel, uniform):  # TarFlow's MNIST notebook: patch 4, width 128, 4 blocks x 4 layers
        assert (cfg.model.mode, cfg.flow.patch_size, cfg.flow.channels) == ("pixel", 4, 128)
        assert (cfg.flow.layers_per_block, cfg.flow.head_dim, cfg.flow.conditioning) == ([4] * 4, 64, "add")
    assert (pixel.model.noise_type, uniform.model.noise_type) == ("gaussian", "uniform")
    assert pixel.sample.denoise and pixel.eval.guidance_weights and not uniform.eval.guidance_weights
    # the gFID comparison is at the same update count and batch
    assert len({(c.train.steps, c.train.global_batch_size) for c in units.values()}) == 1
    sweep = S.load_study(_overlay("tarflow", "tarflow_sweep"))
    assert {S.resolved_config(u).model.latent_noise_std for k, u in sweep.units.items()
            if not k.startswith("_")} == {0.05, 0.1, 0.2}


def test_paper_config_values():
    study = S.load_study(CONFIGS["config"])
    cfg = S.resolved_config(study.units["simflow/s0"])
    assert (cfg.vae.posterior, cfg.vae.fixed_std, cfg.vae.latent_channels) == ("fixed", 0.5, 64)
    assert cfg.vae.channel_mult == [1, 1, 2, 2, 4] and cfg.vae.base_channels == 128
    assert cfg.vae.num_res_blocks == 2 and cfg.vae.attn_resolutions == [16]
    assert cfg.flow.channels == 1152 and cfg.flow.layers_per_block == [2, 2, 2, 2, 2, 46]
    assert (cfg.flow.head_dim, cfg.flow.patch_size) == (64, 1)
    assert cfg.train.global_batch_size == 256 and cfg.sample.num_samples == 50000
    assert cfg.data.name == "imagefolder" and cfg.eval.feature_extractor == "inception-v3-compat"
    repa = S.resolved_config(study.units["simflow_repa/s0"]).model
    assert (repa.repa_layer, repa.repa_target) == (3, "dinov2_vitb14") and repa.repa_weight > 0
    # the paper study uses Inception: no classifier stage; frozen variants need the pretrained VAE
    assert not study.needs_feature_extractor and study.needs_fid_ref and study.pretrain_seeds == [0]
    assert S.launcher_for(study, "train")["nodes"] == 2
    assert S.launcher_for(study, "train")["gpus_per_node"] == 8


_SOURCE = re.compile(r"#.*(published|INFERRED|REPA-E|REPA default|STARFlow|TarFlow|workflow|NOT PUBLISHED)")


def test_paper_config_says_where_every_base_value_comes_from():
    """Every value line of base/pretrain_vae in config.yaml carries a source comment (its own or,
    for a sub-mapping, the section header's)."""
    lines = CONFIGS["config"].read_text().splitlines()
    in_section, missing = False, []
    for line in lines:
        if re.match(r"^(base|pretrain_vae):", line):
            in_section = True
            continue
        if re.match(r"^\S", line):
            in_section = False
        if not in_section or not line.strip() or line.strip().startswith("#"):
            continue
        _, _, value = line.split("#")[0].partition(":")
        if value.strip() and not _SOURCE.search(line):
            missing.append(line.strip())
    assert not missing, f"values without a source comment: {missing}"


def test_demo_study_is_small_and_self_contained():
    study = S.load_study(CONFIGS["demo"])
    assert study.needs_feature_extractor  # FID proxy: the demo classifier, nothing to download
    for unit, cfg in study.units.items():
        full = S.resolved_config(cfg)
        assert full.data.name == "fashion_mnist" and full.data.image_size == 32
        if not unit.startswith(("_shared/fid_ref", "_shared/fid_floor", "_shared/feature_extractor")):  # no training
            assert full.train.steps <= 500 and full.sample.num_samples <= 1000
            assert full.model.lpips_weight == 0  # no VGG weights offline
    assert all(S.launcher_for(study, s)["backend"] == "local" for s in STAGES)


# ------------------------------------------------------------------------------------------
# variant configs
# ------------------------------------------------------------------------------------------
def test_variant_config_merges_base_and_overrides_and_links_shared_outputs():
    study = S.load_study(_tiny())
    cfg = S.variant_config(study, "frozen", 3)
    assert cfg["study"] == "tiny" and cfg["variant"] == "frozen"
    assert cfg["run_dir"] == "res/tiny/frozen/s3" and cfg["results_root"] == "res"
    assert cfg["train"]["seed"] == 3 and cfg["sample"]["seed"] == 3
    assert cfg["data"] == {"name": "digits", "image_size": 16}  # from base
    assert cfg["model"]["mode"] == "frozen_vae"  # from the overrides
    assert cfg["model"]["pretrained_vae"] == "res/tiny/_shared/pretrain_vae/s3/vae.pt"
    assert cfg["eval"]["classifier_path"] == "res/tiny/_shared/feature_extractor/classifier.pt"
    assert cfg["eval"]["reference_stats"] == "res/tiny/_shared/fid_ref/reference_stats.npz"
    assert cfg["tracking"] == {"enabled": False, "tracking_uri": None, "experiment": "tiny",
                               "run_id_file": "res/tiny/frozen/s3/mlflow_run_id.txt"}
    assert "launcher" not in cfg
    # the end-to-end variant does not get a pretrained VAE
    assert "pretrained_vae" not in S.variant_config(study, "simflow", 0).get("model", {})
    assert set(study.units) == {"simflow/s0", "simflow/s3", "frozen/s0", "frozen/s3",
                                "_shared/pretrain_vae/s0", "_shared/pretrain_vae/s3",
                                "_shared/fid_ref", "_shared/fid_floor", "_shared/feature_extractor"}


def test_base_is_not_mutated_by_variant_configs():
    study = S.load_study(_tiny())
    before = copy.deepcopy(study.base)
    S.variant_config(study, "frozen", 0)["data"]["name"] = "changed"
    assert study.base == before


def test_shared_units_read_only_what_they_need():
    study = S.load_study(_tiny(base={"data": {"name": "digits"}, "flow": {"channels": 64},
                                     "eval": {"feature_extractor": "simflow-classifier",
                                              "classifier_steps": 7, "num_recon": 9}}))
    fe = S.shared_config(study, "feature_extractor")
    ref = S.shared_config(study, "fid_ref")
    assert "flow" not in fe and "flow" not in ref  # a flow change does not re-run them
    assert fe["eval"] == {"classifier_steps": 7}
    assert ref["eval"]["classifier_path"].endswith("_shared/feature_extractor/classifier.pt")
    assert "reference_stats" not in ref["eval"] and "num_recon" not in ref["eval"]
    # the real-vs-real floor: as many test images as a variant samples, against fid-ref's statistics
    study = S.load_study(_tiny(base={"data": {"name": "digits"}, "flow": {"channels": 64}, "sample": {"num_samples": 77},
                                     "eval": {"feature_extractor": "simflow-classifier", "num_recon": 9}}))
    floor = S.shared_config(study, "fid_floor")
    assert "flow" not in floor and floor["sample"] == {"num_samples": 77} and "num_recon" not in floor["eval"]
    assert floor["eval"]["reference_stats"].endswith("_shared/fid_ref/reference_stats.npz")
    assert floor["eval"]["classifier_path"].endswith("_shared/feature_extractor/classifier.pt")
    pre = S.shared_config(study, "pretrain_vae", 0)
    assert pre["flow"] == {"channels": 64} and pre["vae"]["posterior"] == "learnable"


def test_external_reference_stats_and_classifier_drop_the_shared_stages():
    study = S.load_study(_tiny(base={"data": {"name": "digits"},
                                     "eval": {"reference_stats": "adm.npz",
                                              "feature_extractor": "inception-v3-compat"}}))
    assert not study.needs_fid_ref and not study.needs_feature_extractor
    assert S.variant_config(study, "simflow", 0)["eval"]["reference_stats"] == "adm.npz"
    assert S.shared_config(study, "fid_floor")["eval"]["reference_stats"] == "adm.npz"  # the floor stays


def test_repa_with_the_classifier_target_uses_the_trained_classifier():
    raw = _tiny(base={"data": {"name": "digits"}})  # Inception FID: only REPA needs the classifier
    raw["variants"]["repa"] = {"group": "latent", "sigma": 0.5,
                               "overrides": {"model": {"repa_weight": 0.5, "repa_target": "classifier"}}}
    study = S.load_study(raw)
    assert study.needs_feature_extractor
    cfg = S.variant_config(study, "repa", 0)
    assert cfg["model"]["repa_target_weights_path"] == "res/tiny/_shared/feature_extractor/classifier.pt"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["variants"]["simflow"].update(overrides={"flow": {"chanels": 3}}),
     r"variants\.simflow\.overrides: unknown config key 'flow\.chanels'"),
    (lambda r: r["variants"]["simflow"].update(overrides={"flow": {"channels": "wide"}}),
     r"variants\.simflow\.overrides: flow\.channels: expected an integer"),
    (lambda r: r["variants"]["simflow"].update(overrides={"data": {"image_size": 8}}),
     r"variants\.simflow\.overrides\.data: shared by all variants"),
    (lambda r: r["variants"]["simflow"].update(overrides={"eval": {"feature_extractor": "x"}}),
     r"variants\.simflow\.overrides\.eval\.feature_extractor: shared"),
    (lambda r: r["base"].update(train={"seed": 1}), r"base\.train\.seed must not be set.*seeds"),
    (lambda r: r["base"].update(launcher={"backend": "slurm"}), r"base\.launcher must not be set"),
    (lambda r: r["variants"]["simflow"].update(group="other"), r"variants\.simflow\.group: 'other'"),
    (lambda r: r["variants"]["simflow"].update(sigma=-1), r"variants\.simflow\.sigma"),
    (lambda r: r["variants"]["simflow"].update(extra=1),
     r"unknown config key .variants\.simflow\.extra.; valid keys of variants\.simflow: group"),
    (lambda r: r["variants"].update({"bad/name": {"group": "latent"}}), r"variants\.bad/name"),
    (lambda r: r["variants"].update({"figures": {"group": "latent"}}), r"variants\.figures"),
    (lambda r: r.update(seeds=[0, 0]), r"seeds: expected a non-empty list of distinct"),
    (lambda r: r.update(variants={}), r"variants: expected a non-empty mapping"),
    (lambda r: r.update(unknown=1), r"unknown study key 'unknown'"),
    (lambda r: r["variants"]["frozen"]["overrides"].update(vae={"posterior": "fixed"}),
     r"variants\.frozen: model\.mode frozen_vae loads the pretrained VAE, but its vae\.posterior"),
    (lambda r: r.update(stage_launcher={"trian": {"nodes": 2}}), r"unknown stage 'trian'"),
    (lambda r: r.update(stage_launcher={"train": {"nodes": "two"}}),
     r"launcher of stage train: launcher\.nodes: expected an integer"),
    (lambda r: r.update(launcher_train_gpu=1), r"unknown flat launcher key 'launcher_train_gpu'"),
    (lambda r: r.update(tracking={"run_id_file": "x"}),
     r"unknown config key .tracking\.run_id_file.; valid keys of tracking: enabled"),
])
def test_invalid_study_configs_name_the_key(mutate, message):
    raw = _tiny()
    mutate(raw)
    with pytest.raises(S.StudyError, match=message):
        S.load_study(raw)


def test_mapping_keys_left_empty_in_the_yaml_are_empty_mappings():
    # `overrides:` with nothing after it is None in YAML: an empty mapping, or a section's defaults
    raw = _tiny(launcher=None, stage_launcher=None, preflight={"cpu_overrides": None})
    raw["variants"]["simflow"]["overrides"] = None
    raw["tracking"] = None
    study = S.load_study(raw)
    assert study.variants["simflow"].overrides == {} and study.launcher == {}
    assert study.preflight == {"steps": 200, "cpu_overrides": {}} and study.tracking["enabled"] is True


def test_unknown_variant_and_seed_are_errors():
    study = S.load_study(_tiny())
    with pytest.raises(S.StudyError, match="unknown variant 'nope'"):
        S.variant_config(study, "nope", 0)
    with pytest.raises(S.StudyError, match=r"seed 1 is not in the study's seeds \[0, 3\]"):
        S.variant_config(study, "simflow", 1)


def test_run_names_and_tags():
    study = S.load_study(_tiny())
    assert S.unit_run_name("frozen/s3") == "frozen_s3"  # two seeds: the seed is in the name
    assert S.unit_run_name("_shared/pretrain_vae/s0") == "shared:pretrain_vae_s0"
    assert S.unit_tags(study, "simflow/s0") == {"unit": "simflow/s0", "group": "latent",
                                                "sigma": 0.5, "seed": 0}
    assert S.unit_run_name("frozen/s0") == "frozen_s0"  # one seed or several: the same name


# ------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------
def test_launcher_precedence_and_sets():
    raw = _tiny(launcher={"backend": "local", "cpus_per_task": 4, "timeout_min": 30},
                stage_launcher={"train": {"nodes": 2, "timeout_min": 600},
                                "fid_ref": {"cpus_per_task": 2}},
                launcher_backend="slurm", launcher_partition="gpu", launcher_train_timeout_min=900)
    study = S.load_study(raw)
    train = S.launcher_for(study, "train")
    assert train["backend"] == "slurm" and train["partition"] == "gpu"  # flat keys: every stage
    assert train["nodes"] == 2 and train["cpus_per_task"] == 4  # stage_launcher over launcher
    assert train["timeout_min"] == 900  # launcher_train_* over stage_launcher
    assert S.launcher_for(study, "fid-ref")["cpus_per_task"] == 2  # fid_ref == fid-ref
    assert S.launcher_for(study, "sample")["timeout_min"] == 30
    assert train["log_dir"] == "res/tiny/logs/submitit"
    sets = S.launcher_sets(study, "train")
    # every key (a launcher section left in the config file by an earlier stage must not leak),
    # each value YAML-parsable
    parsed = {s.split("=", 1)[0][len("launcher."):]: yaml.safe_load(s.split("=", 1)[1]) for s in sets}
    assert parsed == train and set(parsed) == set(to_dict(LauncherSection()))
    cfg = load_config(None, sets)
    assert cfg.launcher.backend == "slurm" and cfg.launcher.timeout_min == 900
    stale = {"launcher": {"nodes": 7, "qos": "long"}}  # e.g. written by the train stage
    cfg = load_config(None, S.launcher_sets(study, "sample"), data=stale)
    assert cfg.launcher.nodes == 1 and cfg.launcher.qos is None


def test_stage_command_and_threads_follow_the_backend():
    local = S.load_study(_tiny(threads=2))
    assert S.stage_command(local, "train") == "python3 -m simflow train"
    assert S.stage_threads(local, "train") == 2
    slurm = S.load_study(_tiny(threads=2, launcher_backend="slurm", launcher_cpus_per_task=6))
    assert S.stage_command(slurm, "fid") == "env OMP_NUM_THREADS=6 MKL_NUM_THREADS=6 python3 -m simflow fid"
    assert S.stage_threads(slurm, "fid") == 1  # the rule only waits for the SLURM job


def test_untracked_params_are_not_a_builtin_type():
    value = S.Untracked("--set launcher.backend=slurm")
    assert str(value) == "--set launcher.backend=slurm"
    # Snakemake records only params of builtin types for its params trigger
    assert not isinstance(value, (str, int, float, list, tuple, dict, set, bytes))


# ------------------------------------------------------------------------------------------
# files and MLflow
# ------------------------------------------------------------------------------------------
def test_write_stage_config_round_trips_without_launcher(tmp_path):
    study = S.load_study(_tiny())
    cfg = S.variant_config(study, "frozen", 0)
    path = S.write_stage_config(cfg, tmp_path / "c" / "config.yaml")
    assert "launcher" not in yaml.safe_load(path.read_text())
    assert to_dict(load_config(path)) == to_dict(S.resolved_config(cfg))


def test_config_fingerprint_ignores_defaults_and_order():
    a = {"train": {"steps": 10, "lr": 1e-3}, "flow": {"channels": 128}}
    b = {"flow": {}, "train": {"lr": 1e-3, "steps": 10}}  # channels 128 is the default
    assert S.config_fingerprint(a) == S.config_fingerprint(b)
    assert S.config_fingerprint(a) != S.config_fingerprint({"train": {"steps": 11}})


def test_setup_unit_keeps_checkpoints_of_the_same_config_and_moves_those_of_another(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = S.load_study(_tiny())
    cfg = S.variant_config(study, "simflow", 0)
    run_dir = Path(cfg["run_dir"])
    files = (run_dir / "config.yaml", run_dir / "mlflow_run_id.txt", "parent.txt")
    assert S.setup_unit(cfg, *files, run_name="simflow") is None  # tracking disabled
    assert files[1].read_text() == "tracking disabled\n"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest.pt").write_text("weights")
    files[0].unlink()  # Snakemake removes a job's outputs before it re-runs
    S.setup_unit(cfg, *files, run_name="simflow")
    assert (run_dir / "checkpoints" / "latest.pt").exists()  # same config: resume
    changed = copy.deepcopy(cfg)
    changed.setdefault("train", {})["steps"] = 77
    S.setup_unit(changed, *files, run_name="simflow")
    assert not (run_dir / "checkpoints").exists()
    moved = list(run_dir.glob("checkpoints.superseded-*/latest.pt"))
    assert len(moved) == 1 and moved[0].read_text() == "weights"
    assert load_config(files[0]).train.steps == 77


def test_init_study_and_setup_unit_create_and_reuse_mlflow_runs(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = S.load_study(_tiny(tracking={"enabled": True}, seeds=[0]))
    parent_file = Path(study.parent_run_id_file)
    parent = S.init_study_tracking(study.name, study.results_root, parent_file)
    assert parent_file.read_text().strip() == parent
    cfg = study.units["simflow/s0"]
    run_dir = Path(cfg["run_dir"])
    config_path, run_id_path = run_dir / "config.yaml", run_dir / "mlflow_run_id.txt"
    first = S.setup_unit(cfg, config_path, run_id_path, parent_file, run_name="simflow",
                         tags=S.unit_tags(study, "simflow/s0"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}")
    run = client.get_run(first)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["variant"] == "simflow" and run.data.tags["group"] == "latent"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    # outputs deleted, same config: the same run is reused
    run_id_path.unlink()
    config_path.unlink()
    assert S.setup_unit(cfg, config_path, run_id_path, parent_file, run_name="simflow") == first
    # a changed config gets a new run (MLflow params are immutable)
    changed = copy.deepcopy(cfg)
    changed.setdefault("train", {})["steps"] = 5
    run_id_path.unlink()
    assert S.setup_unit(changed, config_path, run_id_path, parent_file, run_name="simflow") != first


def test_cli_setup_unit_is_setup_unit_and_rejects_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    """The workflow's rule setup_unit: ``python -m simflow.study setup-unit`` with the unit's
    explicit config as JSON (which resolves to the same config as the dict it came from)."""
    monkeypatch.chdir(tmp_path)
    study = S.load_study(_tiny())
    cfg = study.units["simflow/s0"]
    assert S.config_fingerprint(json.loads(json.dumps(cfg))) == S.config_fingerprint(cfg)
    out = tmp_path / "cli"
    args = ["setup-unit", "--unit", "simflow/s0", "--config", json.dumps(cfg), "--tags",
            json.dumps(S.unit_tags(study, "simflow/s0")), "--out-config", str(out / "config.yaml"),
            "--out-run-id", str(out / "run_id.txt"), "--parent", "parent.txt"]
    assert S.main(args) == 0
    assert capsys.readouterr().out == f"simflow/s0: config {out / 'config.yaml'}, MLflow run None\n"
    S.write_stage_config(cfg, tmp_path / "direct.yaml")
    assert (out / "config.yaml").read_text() == (tmp_path / "direct.yaml").read_text()
    assert (out / "run_id.txt").read_text() == "tracking disabled\n"
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, status 2
        S.main([*args[:4], "{not json", *args[5:]])
    assert exit_info.value.code == 2 and "not JSON" in capsys.readouterr().err
    bad = copy.deepcopy(cfg)
    bad["vae"] = {"posterior": "sometimes"}
    bad_args = [*args[:4], json.dumps(bad), *args[5:]]
    assert S.main(bad_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m simflow.study setup-unit: error: simflow/s0: ") and "sometimes" in err
    proc = subprocess.run([sys.executable, "-m", "simflow.study", *bad_args], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------------
# schema, docs, command line
# ------------------------------------------------------------------------------------------
def test_committed_schema_is_the_generated_one():
    committed = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert committed == json.loads(json.dumps(S.study_schema())), (
        "regenerate with: python -m simflow.study schema > workflow/schemas/config.schema.yaml")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_pass_the_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_raw(name), S.study_schema())


def test_schema_rejects_a_misspelled_study_key():
    jsonschema = pytest.importorskip("jsonschema")
    raw = _raw("smoke")
    raw["variants"]["simflow"]["overides"] = {}
    with pytest.raises(jsonschema.ValidationError, match="overides"):
        jsonschema.validate(raw, S.study_schema())


def test_readme_documents_every_key():
    readme = (REPO / "config" / "README.md").read_text()
    stage_keys = [k for k, *_ in describe(Config)
                  if k.split(".")[0] not in ("study", "variant", "run_dir", "results_root")]
    study_keys = list(S.study_schema()["properties"]) + ["launcher_<key>", "launcher_<stage>_<key>"]
    missing = [k for k in stage_keys + study_keys if f"`{k}`" not in readme]
    assert not missing, f"config/README.md does not explain: {missing}"


def test_cli_check_and_schema(capsys, tmp_path):
    assert S.main(["check", str(CONFIGS["smoke"])]) == 0
    assert "study smoke" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    raw = _raw("smoke")
    raw["variants"]["simflow"]["overrides"] = {"vae": {"posterior": "sometimes"}}
    bad.write_text(yaml.safe_dump(raw))
    assert S.main(["check", str(bad)]) == 2
    assert "variants.simflow.overrides: vae.posterior: 'sometimes'" in capsys.readouterr().err
    # a study and its overlays, merged as Snakemake merges --configfile; a broken overlay names
    # its file and line (Snakemake's own parse error does not)
    assert S.main(["check", "--merged", str(CONFIGS["demo"]), str(CONFIGS["demo"].parent / "claims.yaml")]) == 0
    assert "study claims: 6 variants x 5 seed(s)" in capsys.readouterr().out
    broken = tmp_path / "overlay.yaml"
    broken.write_text("study: x\nbase:\n  train: {steps: 3\n")
    assert S.main(["check", "--merged", str(CONFIGS["demo"]), str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"{broken}:4:1: study config is not valid YAML")
    assert S.main(["schema"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["title"] == "SimFlow study config"
