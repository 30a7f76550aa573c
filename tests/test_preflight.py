"""The preflight (simflow/preflight.py, workflow/rules/preflight.smk): a rehearsal of every training
run of a study, with red rows for what would fail the real run.

Stage-level tests rehearse units of the smoke study through the CLI: a healthy one, an injected
collapse (an absurd rate weight), an injected NaN (an absurd learning rate) and a missing dataset.
The report is built from their rows; the workflow test runs `snakemake preflight` on the smoke
study with the collapse and the NaN as extra variants.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simflow import preflight as P
from simflow import study as S
from simflow.cli import main
from simflow.contracts import CONFIG_FILE

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def smoke_study(results: Path, **changes) -> S.Study:
    raw = copy.deepcopy(SMOKE)
    raw["results_root"] = str(results)
    raw["tracking"] = {"enabled": False}
    raw.update(changes)
    return S.load_study(raw)


def rehearse(study: S.Study, unit: str, *extra: str) -> dict:
    """`simflow preflight` of ``unit`` as the workflow calls it (plus ``extra`` --set values)."""
    config = Path(study.unit_dir(unit)) / CONFIG_FILE
    S.write_stage_config(study.units[unit], config)
    sets = S.preflight_launcher_sets(study, unit) + S.preflight_sets(study, unit) + list(extra)
    assert main(["preflight", "-c", str(config)] + [a for s in sets for a in ("--set", s)]) == 0
    return json.loads((Path(study.unit_dir(unit)) / P.ROW_FILE).read_text())


def failed(row: dict) -> dict[str, str]:
    return {c["check"]: c["message"] for c in row["checks"] if c["status"] == "fail"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    """Rehearsals of the smoke study's simflow unit: as configured, and with each injected fault."""
    root = tmp_path_factory.mktemp("preflight")
    out = {}
    for name, extra in {"healthy": [], "collapse": ["model.decoder_scale=100"],
                        "nan": ["train.lr=1e6", "train.vae_lr=1e6"]}.items():
        out[name] = rehearse(smoke_study(root / name), "simflow/s0", *extra)
    missing = smoke_study(root / "missing", base={**SMOKE["base"], "data": {"name": "imagefolder",
                                                                            "root": "/nonexistent",
                                                                            "image_size": 16}})
    out["missing"] = rehearse(missing, "simflow/s0")
    out["_root"] = root
    return out


def test_a_healthy_rehearsal_is_not_red_and_leaves_the_real_run_alone(rows):
    row = rows["healthy"]
    assert row["verdict"] in ("ok", "warn"), failed(row)
    assert row["rehearsal"]["ran"] and row["rehearsal"]["steps_logged"] == SMOKE["preflight"]["steps"]
    assert row["layout"] == {"world_size": 1, "global_batch": 16, "per_gpu_batch": 16, "micro_batch": 16,
                             "accumulation": 1}
    assert row["loss"]["falls"] and len(row["loss"]["curve"]) == P.LOG_POINTS
    assert row["collapsed"] is False and row["nonfinite_step"] is None
    assert row["rate"]["rate_per_dim"] > SMOKE["base"]["train"].get("collapse_threshold", 0.05)
    assert row["memory"]["peak_gb"] > 0 and row["throughput"]["img_per_s"] > 0
    proj = row["projection"]
    assert proj["steps"] == SMOKE["base"]["train"]["steps"] and proj["wall_s"] > 0 and proj["device_kind"] == "cpu"
    assert row["disk"]["checkpoint_gb"] > 0 and row["disk"]["need_gb"] > row["disk"]["checkpoint_gb"]
    # the shared stages' outputs do not exist yet: pending, named by the rule that writes them
    pending = {c["check"]: c.get("rule") for c in row["checks"] if c["status"] == "pending"}
    assert pending == {"feature_extractor": "feature_extractor", "reference_stats": "fid_ref"}
    assert {c["check"] for c in row["checks"] if c["status"] == "ok"} >= {"data.train", "data.test", "collapse"}
    unit = rows["_root"] / "healthy" / "smoke" / "simflow" / "s0"
    assert not (unit / "checkpoints").exists() and not (unit / "model.pt").exists()
    assert not (unit / "preflight" / "checkpoints").exists()  # measured, then deleted


def test_an_absurd_rate_weight_is_a_red_collapse(rows):
    row = rows["collapse"]
    assert row["verdict"] == "fail" and set(failed(row)) == {"collapse"}, failed(row)
    assert row["collapsed"] is True
    key = next(c["key"] for c in row["checks"] if c["check"] == "collapse")
    assert "model.decoder_scale" in key


def test_an_absurd_learning_rate_is_a_red_nan(rows):
    row = rows["nan"]
    assert row["verdict"] == "fail" and set(failed(row)) == {"nonfinite"}, failed(row)
    assert row["nonfinite_step"] is not None and "non-finite loss at step" in failed(row)["nonfinite"]
    assert not row["throughput"].get("img_per_s")  # no steady state to measure


def test_a_missing_dataset_is_a_red_row_naming_the_path(rows):
    row = rows["missing"]
    assert row["verdict"] == "fail"
    bad = failed(row)
    assert "/nonexistent" in bad["data.train"] and "/nonexistent" in bad["data.test"]
    assert next(c["key"] for c in row["checks"] if c["check"] == "data.train") == "data.root"
    assert row["rehearsal"] == {"ran": False, "steps": SMOKE["preflight"]["steps"],
                                "skipped": "the training data is not readable"}


def test_the_report_of_the_rows(rows, tmp_path):
    entry = S.preflight_plan(smoke_study(tmp_path))[0]  # the simflow unit, rehearsed four ways
    names = ("healthy", "collapse", "nan", "missing")
    plan = [{**entry, "unit": f"{name}/s0", "name": name} for name in names]
    report = P.build_report([{**rows[name], "unit": f"{name}/s0"} for name in names], plan, "smoke",
                            SMOKE["preflight"]["steps"])
    assert report["verdict"] == "fail" and report["counts"]["fail"] == 3
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["healthy"]["verdict"] != "fail"
    text = P.write_report(report, tmp_path / "report.md", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "fail"
    lines = {line.split("|")[2].strip(" `"): line for line in text.splitlines() if line.startswith("| 🔴")
             or line.startswith("| 🟢") or line.startswith("| 🟠")}
    assert "collapse:" in lines["collapse"] and "`model.decoder_scale" in lines["collapse"]
    assert "nonfinite:" in lines["nan"] and "data.train:" in lines["missing"]
    assert "## Produced by the workflow" in text and "rule `fid_ref`" in text
    assert report["totals"]["device_hours"] > 0 and report["totals"]["not_projected"] == ["nan", "missing"]


def _row(unit, name, wall_s, runs=1, after=None):
    return {"unit": unit, "verdict": "ok", "stage": "pretrain-vae" if name == "pretrain_vae" else "train",
            "checks": [], "projection": {"steps": 1000, "wall_s": wall_s, "device_hours": 16 * wall_s / 3600,
                                         "device_kind": "cuda"},
            "disk": {"need_gb": 10.0, "free_gb": 25.0}}


def test_study_totals_time_limits_and_disk():
    slurm = {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "timeout_min": 1440, "signal_delay_s": 120,
             "max_num_timeout": 1}
    plan = [{"unit": "a/s0", "name": "a", "stage": "train", "group": "latent", "runs": 2, "after": None,
             "world_size": 16, "launcher": slurm},
            {"unit": "f/s0", "name": "f", "stage": "train", "group": "latent", "runs": 1, "after": "pretrain_vae",
             "world_size": 16, "launcher": slurm},
            {"unit": "_shared/pretrain_vae/s0", "name": "pretrain_vae", "stage": "pretrain-vae", "group": "shared",
             "runs": 1, "after": None, "world_size": 16, "launcher": {**slurm, "max_num_timeout": 20}}]
    day = 86400.0
    rows = [_row("a/s0", "a", 3 * day), _row("f/s0", "f", 1 * day), _row("_shared/pretrain_vae/s0", "pretrain_vae", 2.5 * day)]
    report = P.build_report(rows, plan, "paper", 300)
    t = report["totals"]
    assert t["runs"] == 4 and t["device_hours"] == pytest.approx(16 * (2 * 3 + 1 + 2.5) * 24)
    assert t["parallel_wall_s"] == pytest.approx(3.5 * day) and "pretrain_vae" in t["critical_path"]
    assert t["serial_wall_s"] == pytest.approx((2 * 3 + 1 + 2.5) * day)
    by = {r["name"]: r for r in report["rows"]}
    # 3 days need 4 attempts of 24 h (less the signal delay), but max_num_timeout 1 allows 2
    limit = next(c for c in by["a"]["checks"] if c["check"] == "time_limit")
    assert limit["status"] == "fail" and "launcher_train_max_num_timeout" in limit["key"]
    assert by["a"]["verdict"] == "fail" and by["pretrain_vae"]["verdict"] == "ok"
    # 4 runs x 10 GiB do not fit into 25 GiB
    assert report["study_checks"][0]["check"] == "disk" and report["verdict"] == "fail"
    text = P.render_markdown(report)
    assert "3.5 d" in text and "if every run starts at once" in text


def test_gpu_measurements_and_out_of_memory(tmp_path, monkeypatch):
    """The CUDA branch (memory, MFU, projection on the configured 16 GPUs) with a faked device:
    no GPU is needed to check its arithmetic."""
    from types import SimpleNamespace

    import torch

    from simflow import flops
    from simflow.config import load_config
    from simflow.model import build_model
    study = smoke_study(tmp_path)
    unit = study.units["simflow/s0"]
    cfg = load_config(data={**unit, "train": {**unit["train"], "global_batch_size": 256, "steps": 1000},
                            "preflight": {"target_world_size": 16, "steps": 20}})
    rcfg, real, reduced = P.rehearsal_config(cfg, 1, False, tmp_path, {})
    assert real == {"world_size": 16, "global_batch": 256, "per_gpu_batch": 16, "micro_batch": 16, "accumulation": 1}
    assert (rcfg.train.global_batch_size, rcfg.train.steps, rcfg.train.min_lr_ratio, reduced) == (16, 20, 1.0, False)
    model = build_model(cfg, 1, 10)
    result = SimpleNamespace(model=model, summary={"rate": {"rate_per_dim": 0.3}, "collapsed": False,
                                                   "collapse_alarm_step": None,
                                                   "num_params": {"flow": 2**28, "vae": 10}})
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 72 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 74 * gib)
    monkeypatch.setattr(flops, "bf16_peak_tflops", lambda d: 1000.0)
    collector = P._Collector()
    for step, img_s in ((2, 50.0), (4, 200.0), (6, 200.0)):
        collector.log_metrics({"train/total": 3.0 / step, "train/img_per_s": img_s}, step)
    row, findings = {"rehearsal": {"seconds": 1.0}}, P.Findings()
    env = SimpleNamespace(device=torch.device("cuda", 0), world_size=1)
    P._measure(row, findings, cfg, rcfg, env, collector, result, real, False, False, False)
    assert row["memory"]["peak_gb"] == 72 and row["memory"]["allreduce_buffer_gb"] == 1.0  # 4 B x 2^28
    warn = {c["check"]: c for c in findings.items if c["status"] == "warn"}
    assert "memory" in warn and warn["memory"]["key"] == "train.micro_batch_size"  # 72 + 1 GiB > 90 % of 80
    thr = row["throughput"]
    assert thr["img_per_s"] == 200.0 and thr["s_per_step"] == pytest.approx(16 / 200)  # the first window is start-up
    flow_flops = flops.train_flops(model.flow, 16)["total_flops"]
    assert thr["mfu"] == pytest.approx(flow_flops / (16 / 200) / 1e12 / 1000.0)
    proj = row["projection"]
    assert proj["wall_s"] == pytest.approx(1000 * 16 / 200) and proj["device_hours"] == pytest.approx(16 * 80 / 3600)
    # out of memory at the configured micro-batch: red, naming the micro-batch that halves it
    findings, row = P.Findings(), {}
    P._training_failure(findings, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), real, row)
    assert findings.items[0]["check"] == "memory" and findings.items[0]["status"] == "fail" and row["oom"]
    assert "train.micro_batch_size: 8 (accumulation 2)" in findings.items[0]["message"]


def test_a_job_that_dies_is_a_red_row(tmp_path, monkeypatch):
    from simflow import runner
    from simflow.launch import LaunchError
    study = smoke_study(tmp_path)
    unit = "simflow/s0"
    config = Path(study.unit_dir(unit)) / CONFIG_FILE
    S.write_stage_config(study.units[unit], config)

    def dead(*args, **kwargs):
        raise LaunchError("job 123 ended in state OUT_OF_MEMORY; logs: x.out, x.err")

    monkeypatch.setattr(runner, "run_stage", dead)
    assert main(["preflight", "-c", str(config)] + [a for s in S.preflight_sets(study, unit) for a in ("--set", s)]) == 0
    row = json.loads((Path(study.unit_dir(unit)) / P.ROW_FILE).read_text())
    assert row["verdict"] == "fail" and "OUT_OF_MEMORY" in failed(row)["job"]
    assert "mem_gb" in row["checks"][0]["key"]


# ------------------------------------------------------------------------------------------
# the study's preflight section and launcher
# ------------------------------------------------------------------------------------------
def test_the_paper_study_rehearses_each_variant_on_one_gpu_of_the_train_launcher():
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["launcher_backend"] = "slurm"
    raw["launcher_partition"] = "gpu"
    raw["launcher_train_constraint"] = "h100"
    study = S.load_study(raw)
    units = S.preflight_units(study)
    assert len(units) == len(raw["variants"]) + 1 and units["_shared/pretrain_vae/s0"] == "pretrain-vae"
    launcher = S.preflight_launcher(study, "train")
    assert (launcher["backend"], launcher["nodes"], launcher["gpus_per_node"], launcher["max_num_timeout"]) == (
        "slurm", 1, 1, 0)
    assert launcher["partition"] == "gpu" and launcher["constraint"] == "h100" and launcher["timeout_min"] == 60
    sets = S.preflight_sets(study, "simflow/s0")
    assert "preflight.target_world_size=16" in sets and "preflight.steps=300" in sets
    plan = {e["name"]: e for e in S.preflight_plan(study)}
    assert plan["frozen_vae"]["after"] == "pretrain_vae" and plan["simflow"]["after"] is None
    assert plan["simflow"]["world_size"] == 16 and plan["simflow"]["launcher"]["timeout_min"] == 1440
    # the flat launcher_preflight_<key> keys win
    raw["launcher_preflight_timeout_min"] = 20
    assert S.preflight_launcher(S.load_study(raw), "train")["timeout_min"] == 20


def test_the_preflight_section_is_validated():
    for bad, message in [({"steps": 0}, "preflight.steps"), ({"stepz": 3}, r"unknown config key .preflight.stepz. \(did you mean .preflight.steps.\?\); valid keys of preflight: steps"),
                         ({"cpu_overrides": {"data": {"root": "/x"}}}, "preflight.cpu_overrides.data.root"),
                         ({"cpu_overrides": {"flow": {"channels": "wide"}}}, "flow.channels")]:
        raw = copy.deepcopy(SMOKE)
        raw["preflight"] = bad
        with pytest.raises(S.StudyError, match=message):
            S.load_study(raw)
    raw = copy.deepcopy(SMOKE)
    raw["base"]["preflight"] = {"steps": 3}
    with pytest.raises(S.StudyError, match="study-level `preflight:`"):
        S.load_study(raw)
    raw = copy.deepcopy(SMOKE)
    raw["variants"]["preflight"] = {"group": "latent"}
    with pytest.raises(S.StudyError, match="not be one of"):
        S.load_study(raw)


def test_the_preflight_section_does_not_change_a_unit():
    """Rehearsal settings are not part of any unit: no retraining when they change."""
    a = smoke_study(Path("/tmp/x"))
    b = smoke_study(Path("/tmp/x"), preflight={"steps": 7})
    assert a.units == b.units
    assert S.config_fingerprint(a.units["simflow/s0"]) == S.config_fingerprint(b.units["simflow/s0"])


# ------------------------------------------------------------------------------------------
# the workflow
# ------------------------------------------------------------------------------------------
def _snakemake(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_workflow import snakemake
    return snakemake(*args, cwd=cwd, timeout=timeout)


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
def test_preflight_target_schedules_only_rehearsals(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["results_root"] = str(tmp_path / "results")
    cfg = tmp_path / "paper.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake("-n", "-p", "--profile", "slurm", "preflight", "--configfile", str(cfg), cwd=REPO, timeout=120)
    from test_workflow import scheduled
    rules = [r for r, _ in scheduled(proc.stdout)]
    assert set(rules) == {"mlflow_init", "setup_unit", "preflight_unit", "preflight_report", "preflight"}
    assert rules.count("preflight_unit") == len(raw["variants"]) + 1
    cmds = [line for line in proc.stdout.splitlines() if " -m simflow preflight " in line]
    assert cmds and all("launcher.backend=\"slurm\"" in c and "launcher.gpus_per_node=1" in c
                        and "preflight.target_world_size=16" in c for c in cmds)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
def test_preflight_of_the_smoke_study_with_injected_faults(tmp_path):
    from mlflow import MlflowClient
    raw = copy.deepcopy(SMOKE)
    raw["results_root"] = str(tmp_path / "results")
    raw["variants"]["injected_collapse"] = {"group": "latent", "sigma": 0.5,
                                            "overrides": {"model": {"decoder_scale": 100.0}}}
    raw["variants"]["injected_nan"] = {"group": "latent", "sigma": 0.5,
                                       "overrides": {"train": {"lr": 1.0e6, "vae_lr": 1.0e6}}}
    cfg = tmp_path / "smoke.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake("-c2", "preflight", "--configfile", str(cfg), cwd=tmp_path)
    study_dir = tmp_path / "results" / "smoke"
    report = json.loads((study_dir / "preflight" / "report.json").read_text())
    by = {r["name"]: r for r in report["rows"]}
    assert list(by) == list(raw["variants"]) + ["pretrain_vae"]
    assert {n for n, r in by.items() if r["verdict"] == "fail"} == {"injected_collapse", "injected_nan"}, {
        n: failed(r) for n, r in by.items()}
    assert set(failed(by["injected_collapse"])) == {"collapse"} and set(failed(by["injected_nan"])) == {"nonfinite"}
    # the frozen variant was rehearsed with a stand-in for the pretrained VAE the workflow will write
    pending = {c["check"]: c["rule"] for c in by["frozen_vae_noise"]["checks"] if c["status"] == "pending"}
    assert pending["pretrained_vae"] == "pretrain_vae" and by["frozen_vae_noise"]["rehearsal"]["ran"]
    assert by["simflow_repa"]["rehearsal"]["ran"] and by["pretrain_vae"]["stage"] == "pretrain-vae"
    text = (study_dir / "preflight" / "report.md").read_text()
    assert "🔴 FAIL" in text and "`injected_collapse`" in text
    assert "Preflight of study `smoke`" in proc.stdout  # the report is printed at the end
    # nothing of the real run was produced
    assert not list(study_dir.glob("*/s0/model.pt")) and not list(study_dir.glob("*/s0/checkpoints"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    parent = (study_dir / "mlflow_parent_run_id.txt").read_text().strip()
    assert {a.path for a in client.list_artifacts(parent, "preflight")} == {"preflight/report.md", "preflight/report.json"}
    assert client.get_run(parent).data.tags["simflow.preflight"] == "fail"
