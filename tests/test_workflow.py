"""Tests of the Snakemake workflow (Snakefile, workflow/rules/*.smk, the profiles, config/*.yaml).

Fast tests run Snakemake itself: ``--lint``, dry runs of every shipped study, and a complete run
of a tiny study in which the study config's ``cli`` points at a stand-in for the simflow CLI
(it writes each stage's contract outputs, so the DAG, the set-up, the summary and the figures
run for real in seconds). On that finished run they check what is re-run after a change: one
variant's overrides, the base config, the launcher, a deleted output.

Slow tests run the smoke study end to end with the real stages, locally and (marker ``slurm``)
through ``snakemake --profile slurm all`` against the local SLURM of tests/slurm/.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from local_slurm import skip_without_slurm

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SUMMARY_COLUMNS = ["variant", "fid", "rfid", "nll_bpd"]

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(*args: str, cwd: Path = REPO, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake on this repository's Snakefile; the result carries ``cpu_s``, the CPU
    seconds the call used (a load-independent measure of its cost)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *args]
    cpu0 = _children_cpu_s()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    proc.cpu_s = _children_cpu_s() - cpu0
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def scheduled(dry_run_output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in the output of ``snakemake -n``."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", dry_run_output):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        if not m:
            continue
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.append((m.group(1), wildcards))
    return jobs


# ------------------------------------------------------------------------------------------
# lint and dry runs of the shipped studies
# ------------------------------------------------------------------------------------------
def test_lint_is_clean():
    proc = snakemake("--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["config", "demo", "smoke"])
def test_dry_run_of_each_study(name, tmp_path):
    proc = snakemake("-n", "--configfile", str(REPO / "config" / f"{name}.yaml"),
                     "--config", f"results_root={tmp_path}/results", cwd=tmp_path)
    jobs = scheduled(proc.stdout)
    rules = {rule for rule, _ in jobs}
    assert {"mlflow_init", "setup_unit", "train", "sample", "fid", "reconstruct", "nll", "latents",
            "summary", "figures", "all"} <= rules
    # the workflow profile (printshellcmds, rerun-incomplete) is applied to every run
    assert f"workflow specific profile {REPO / 'profiles' / 'default'}" in proc.stdout + proc.stderr
    study = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    trained = {wc["variant"] for rule, wc in jobs if rule == "train"}
    assert trained == set(study["variants"])
    if name == "config":
        # < 5 s on an idle 2-core machine (about 2.5 s measured). CPU time, not wall time: CI
        # runners share their cores, and a loaded runner stretches the wall time 3-4x.
        assert proc.cpu_s < 5.0, f"dry run of the paper study used {proc.cpu_s:.1f} CPU seconds"
        assert "feature_extractor" not in rules  # Inception FID: no classifier to train
        assert "pretrain_vae" in rules
    else:
        assert {"feature_extractor", "fid_ref", "pretrain_vae"} <= rules


def test_dry_run_of_the_tarflow_overlay_sweeps_guidance_only_where_asked(tmp_path):
    proc = snakemake("-n", "--configfile", str(REPO / "config" / "demo.yaml"),
                     str(REPO / "config" / "tarflow.yaml"), "--config", f"results_root={tmp_path}/results",
                     cwd=tmp_path)
    jobs = scheduled(proc.stdout)
    assert {wc["variant"] for rule, wc in jobs if rule == "train"} == {
        "frozen_vae", "simflow", "tarflow_pixel", "tarflow_pixel_uniform"}
    for rule in ("guidance", "guidance_figure"):
        assert [wc["variant"] for r, wc in jobs if r == rule] == ["tarflow_pixel"], rule


def test_default_study_is_the_paper_study_and_configfile_replaces_it(tmp_path):
    paper = scheduled(snakemake("-n", "--config", f"results_root={tmp_path}", cwd=REPO).stdout)
    assert {wc.get("variant") for r, wc in paper if r == "train"} >= {"simflow_repa", "tarflow_pixel_uncond"}
    # --configfile is not merged into config/config.yaml: the smoke study keeps its own variants
    smoke = scheduled(snakemake("-n", "--configfile", str(REPO / "config" / "smoke.yaml"),
                                "--config", f"results_root={tmp_path}", cwd=REPO).stdout)
    assert len([1 for r, _ in smoke if r == "train"]) == len(
        yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())["variants"])


def test_invalid_variant_fails_before_any_job(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["variants"]["simflow"]["overrides"] = {"flow": {"channels": "wide"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = snakemake("-n", "--configfile", str(bad), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "variants.simflow.overrides: flow.channels: expected an integer" in proc.stdout + proc.stderr


def _smoke_copy(tmp_path: Path) -> Path:
    """config/smoke.yaml with its results under ``tmp_path/results`` (a file, not --config:
    a command-line --config would replace the slurm profile's `config:`)."""
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["results_root"] = str(tmp_path / "results")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_slurm_profile_switches_the_launcher_only(tmp_path):
    """`--profile slurm` (found as ./slurm from the repo root): every stage gets
    launcher.backend=slurm; the default workflow profile does not override it."""
    proc = snakemake("-n", "-p", "--profile", "slurm", "--configfile", str(_smoke_copy(tmp_path)), cwd=REPO)
    train_cmds = [line for line in proc.stdout.splitlines() if " -m simflow train " in line]
    assert train_cmds and all("--set 'launcher.backend=\"slurm\"'" in c for c in train_cmds)
    assert all("OMP_NUM_THREADS=1" in c for c in train_cmds)  # smoke: cpus_per_task 1
    assert "Using profiles slurm and workflow specific profile" in proc.stdout + proc.stderr
    assert "profile's `config:` entries" not in proc.stdout + proc.stderr
    for line in (REPO / "slurm" / "config.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"uncommented setting in slurm/config.yaml: {line!r}"
    # --config on the command line replaces the profile's config: the run is local, with a warning
    proc = snakemake("-n", "-p", "--profile", "slurm", "--configfile", str(_smoke_copy(tmp_path)),
                     "--config", "threads=1", cwd=REPO)
    assert "launcher.backend=\"slurm\"" not in proc.stdout and "launcher.backend=\"local\"" in proc.stdout
    assert "profile's `config:` entries" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# a complete run with a stand-in CLI
# ------------------------------------------------------------------------------------------
FAKE_CLI = textwrap.dedent('''
    """Stand-in for `python -m simflow <stage> --config FILE [--set k=v ...]`: writes the stage's
    contract outputs (with made-up numbers) and records the call."""
    import json, sys, zlib
    from pathlib import Path
    import numpy as np, yaml
    from simflow.contracts import STAGE_FILES

    stage, cfg_path, sets = sys.argv[1], sys.argv[3], sys.argv[4:]
    cfg = yaml.safe_load(open(cfg_path))
    run = Path(cfg["run_dir"])
    with open(Path(cfg["results_root"]) / "calls.jsonl", "a") as fh:
        fh.write(json.dumps({"stage": stage, "run_dir": str(run), "sets": sets}) + "\\n")
    pixel = cfg["model"]["mode"] == "pixel"
    x = (zlib.crc32(str(run).encode()) % 100) / 10.0  # a different number per unit
    rng = np.random.default_rng(0)
    payload = {
        "classifier.json": {"accuracy": 0.9},
        "train_summary.json": {"steps": cfg["train"]["steps"], "train_time_s": 1.0 + x,
                               "img_per_s": 100.0, "final_loss": 0.5, "finished": True,
                               "rate": {} if pixel else {"rate_per_dim": 0.01 if "sigma0.25" in str(run) else 0.3,
                                                         "active_fraction": 0.9, "nll_weight": 0.02},
                               "collapsed": None if pixel else "sigma0.25" in str(run),
                               "collapse_alarm_step": 4 if "sigma0.25" in str(run) else None,
                               "fid_curve": [{"step": k, "train_time_s": k / 10, "fid": 50.0 - k}
                                             for k in (4, 8)]},
        "metrics/fid.json": {"fid": 10.0 + x, "isc_mean": 2.0, "kid_mean": (10.0 + x) / 1000, "kid_std": 0.001},
        "metrics/real_floor.json": {"fid": 3.0, "kid_mean": 0.0002, "kid_std": 0.0001, "num_images": 8,
                                    "split": "test"},
        "metrics/reconstruct.json": {"rfid": None, "psnr": None, "noise_sweep": []} if pixel else
            {"rfid": 5.0 + x, "psnr": 20.0, "noise_sweep": [
                {"noise_std": s, "psnr": 20.0 - 10 * s, "mse": s} for s in (0.0, 0.5, 1.0)]},
        "metrics/nll.json": {"nll_bpd": 1.0 + x},
    }
    for name in STAGE_FILES[stage].values():
        out = run / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if name in payload:
            out.write_text(json.dumps(payload[name]))
        elif name == "samples.npz":
            np.savez(out, arr_0=rng.integers(0, 255, (8, 8, 8, 1), dtype=np.uint8), labels=np.arange(8))
        elif name == "interpolation.npz":
            np.savez(out, arr_0=np.zeros((0, 1, 1, 1), np.uint8) if pixel else
                     rng.integers(0, 255, (4, 8, 8, 1), dtype=np.uint8))
        elif name == "latents.npz":
            if pixel:
                np.savez(out, not_applicable=True)
            else:
                np.savez(out, mu=rng.normal(size=(4, 2, 4, 4)), z=rng.normal(size=(4, 2, 4, 4)))
        elif name == "reference_stats.npz":
            np.savez(out, mu=np.zeros(4), sigma=np.eye(4))
        else:
            out.write_bytes(b"weights")
''')


def _tiny_study(results: Path) -> dict:
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["study"] = "tiny"
    raw["results_root"] = str(results)
    raw["tracking"] = {"enabled": False}  # MLflow is tested in test_study.py and the slow runs
    raw["variants"] = {"simflow": raw["variants"]["simflow"],
                       "simflow_sigma0.25": {"group": "sigma_sweep", "sigma": 0.25,
                                             "overrides": {"vae": {"fixed_std": 0.25}}},
                       "frozen_vae_noise": raw["variants"]["frozen_vae_noise"],
                       "tarflow_pixel": raw["variants"]["tarflow_pixel"]}
    return raw


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A tiny study run to completion with the stand-in CLI."""
    root = tmp_path_factory.mktemp("wf")
    (root / "fake_simflow.py").write_text(FAKE_CLI)
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(_tiny_study(root / "results"), sort_keys=False))
    args = ["--configfile", str(study), "--config", f"cli={sys.executable} {root / 'fake_simflow.py'}"]
    proc = snakemake("-c2", *args, cwd=root, timeout=300)
    return {"root": root, "study": study, "args": args, "log": proc.stdout + proc.stderr,
            "results": root / "results" / "tiny"}


def test_finished_run_has_the_summary_and_figures(finished):
    import pandas as pd

    res = finished["results"]
    summary = pd.read_csv(res / "summary.csv")
    assert list(summary.columns[:12]) == ["variant", "group", "sigma", "posterior", "decoder_scale", "n_seeds",
                                          "collapsed", "kid", "fid", "rfid", "rate_per_dim", "nll_bpd"]
    assert (summary["fid_floor"] == 3.0).all() and (summary["kid_floor"] == 0.0002).all()
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    assert {"spectral_entropy", "total_variation", "train_time_s", "img_per_s"} <= set(summary.columns)
    assert list(summary["variant"]) == ["simflow", "simflow_sigma0.25", "frozen_vae_noise", "tarflow_pixel"]
    pixel = summary.set_index("variant").loc["tarflow_pixel"]
    assert pd.isna(pixel["rfid"]) and pd.isna(pixel["total_variation"]) and pixel["fid"] > 0
    rows = summary.set_index("variant")
    assert rows.loc["simflow", "posterior"] == "fixed σ̄=0.5" and rows.loc["simflow", "decoder_scale"] == "calibrated"
    assert rows.loc["simflow_sigma0.25", "collapsed"] and not rows.loc["simflow", "collapsed"]
    assert rows.loc["frozen_vae_noise", "total_updates"] == 16  # 8 pre-training + 8 flow steps
    claims = {c["id"]: c for c in json.loads((res / "claims.json").read_text())}
    assert all("invalid" not in c for c in claims.values())  # the collapsed variant is in no claim
    curves = pd.read_csv(res / "fid_curves.csv")
    assert len(curves) == 2 * 4 and set(curves["step"]) == {4, 8}
    for name in ("fig2_gfid_training", "fig3a_noise_robustness", "fig3b_interpolations", "fig4_latent_stats",
                 "fig5_fid", "fig_rate_sweep", "samples_grid"):
        assert (res / "figures" / f"{name}.png").stat().st_size > 0
        assert (res / "figures" / f"{name}.pdf").stat().st_size > 0
    assert "## Claims" in (res / "summary.md").read_text()
    noise = pd.read_csv(res / "noise_robustness.csv")
    assert set(noise["variant"]) == {"simflow", "simflow_sigma0.25", "frozen_vae_noise"}


def test_each_stage_ran_once_per_unit_with_its_launcher_arguments(finished):
    calls = [json.loads(line) for line in (finished["root"] / "results" / "calls.jsonl").read_text().splitlines()]
    res = finished["results"]
    by_stage: dict[str, list[str]] = {}
    for call in calls:
        by_stage.setdefault(call["stage"], []).append(call["run_dir"])
        assert "--set" in call["sets"] and "launcher.cpus_per_task=1" in call["sets"]
    variants = [f"{res}/{v}/s0" for v in ("simflow", "simflow_sigma0.25", "frozen_vae_noise", "tarflow_pixel")]
    for stage in ("train", "sample", "fid", "reconstruct", "nll", "latents"):
        assert sorted(by_stage[stage]) == sorted(variants)
    assert by_stage["pretrain-vae"] == [f"{res}/_shared/pretrain_vae/s0"]
    assert by_stage["fid-ref"] == [f"{res}/_shared/fid_ref"]
    assert by_stage["fid-floor"] == [f"{res}/_shared/fid_floor"]
    assert by_stage["feature-extractor"] == [f"{res}/_shared/feature_extractor"]
    # the frozen variant's config points at the pretrained VAE
    cfg = yaml.safe_load((res / "frozen_vae_noise" / "s0" / "config.yaml").read_text())
    assert cfg["model"]["pretrained_vae"] == f"{res}/_shared/pretrain_vae/s0/vae.pt"


def test_nothing_to_do_after_a_finished_run_even_with_another_launcher(finished):
    for extra in ([], ["launcher_backend=slurm", "launcher_train_timeout_min=999"]):
        args = finished["args"][:-1] + [finished["args"][-1], *extra]
        proc = snakemake("-n", *args, cwd=finished["root"])
        assert scheduled(proc.stdout) == [], proc.stdout[-2000:]


def _changed(finished, tmp_name: str, mutate) -> list[tuple[str, dict[str, str]]]:
    raw = yaml.safe_load(finished["study"].read_text())
    mutate(raw)
    path = finished["root"] / tmp_name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = ["--configfile", str(path), *finished["args"][2:]]
    return scheduled(snakemake("-n", *args, cwd=finished["root"]).stdout)


def test_changing_one_variant_reruns_only_that_variant(finished):
    jobs = _changed(finished, "one.yaml",
                    lambda r: r["variants"]["simflow_sigma0.25"]["overrides"]["vae"].update(fixed_std=0.3))
    units = {wc.get("unit") or f"{wc['variant']}/s{wc['seed']}" for rule, wc in jobs
             if "unit" in wc or "variant" in wc}
    assert units == {"simflow_sigma0.25/s0"}
    assert sorted(r for r, _ in jobs) == sorted(["setup_unit", "train", "sample", "fid", "reconstruct",
                                                 "nll", "latents", "summary", "figures", "all",
                                                 "analysis_notebook", "analysis_notebook",
                                                 "report_summary", "mlflow_study_outputs"])


def test_changing_the_base_reruns_every_variant(finished):
    jobs = _changed(finished, "base.yaml", lambda r: r["base"]["flow"].update(channels=48))
    trained = {wc["variant"] for rule, wc in jobs if rule == "train"}
    assert trained == {"simflow", "simflow_sigma0.25", "frozen_vae_noise", "tarflow_pixel"}
    # the flow is not an input of the classifier or the reference statistics
    assert not {"feature_extractor", "fid_ref", "fid_floor"} & {r for r, _ in jobs}


def test_a_deleted_output_reruns_only_its_job_and_the_analysis(finished):
    nll = finished["results"] / "simflow" / "s0" / "metrics" / "nll.json"
    saved = nll.read_text()
    nll.unlink()
    try:
        jobs = scheduled(snakemake("-n", *finished["args"], cwd=finished["root"]).stdout)
    finally:
        nll.write_text(saved)
        os.utime(nll, (time.time() - 3600,) * 2)  # older than the summary again
    assert sorted(r for r, _ in jobs) == ["all", "analysis_notebook", "analysis_notebook", "figures",
                                          "mlflow_study_outputs", "nll", "report_summary", "summary"]


def test_report_holds_the_figures_the_summary_and_the_notebooks(finished):
    """`snakemake --report report.html`: one self-contained file (everything embedded)."""
    report = finished["root"] / "report.html"
    snakemake("--report", str(report), *finished["args"], cwd=finished["root"])
    html = report.read_text()
    for name in ("fig3a_noise_robustness", "fig3b_interpolations", "fig4_latent_stats", "fig5_fid",
                 "summary.html", "latent_space.html", "variants.html"):
        assert name in html
    assert "SimFlow reproduction study" in html  # workflow/report/workflow.rst
    page = (finished["results"] / "summary.html").read_text()
    assert "<table" in page and "simflow_sigma0.25" in page


def test_the_study_outputs_record_without_tracking(finished):
    record = json.loads((finished["results"] / "mlflow_study_outputs.json").read_text())
    assert record["run_id"] is None  # tracking disabled: nothing logged, the record still written
    assert record["metrics"]["gfid/simflow"] > 0
    # the seven figures of the figures rule (Figures 2, 3a, 3b, 4, 5, the rate sweep, the samples)
    assert len(record["artifacts"]["figures"]) == 7 and len(record["artifacts"]["notebooks"]) == 4


# ------------------------------------------------------------------------------------------
# the real stages (slow)
# ------------------------------------------------------------------------------------------
def _run_smoke(tmp_path: Path, *extra: str, cwd: Path | None = None) -> Path:
    snakemake(*extra, "--configfile", str(_smoke_copy(tmp_path)), cwd=cwd or tmp_path, timeout=900)
    return tmp_path / "results"


def _check_smoke(results: Path) -> list:
    """The smoke study's tables and MLflow store: the experiment opens on the runs (model
    training), the parent run spans the study and holds its outputs, a child run per unit."""
    import pandas as pd
    from mlflow import MlflowClient

    summary = pd.read_csv(results / "smoke" / "summary.csv")
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    study = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    assert list(summary["variant"]) == list(study["variants"])
    assert summary["fid"].notna().all() and summary["nll_bpd"].notna().all()
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = (results / "smoke" / "mlflow_parent_run_id.txt").read_text().strip()
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    names = [f"{v}_s{seed}" for v in study["variants"] for seed in study["seeds"]]  # unit_run_name
    assert set(names) <= set(children)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    study_run = client.get_run(parent)
    assert study_run.info.status == "FINISHED"
    assert study_run.info.end_time - study_run.info.start_time > 10_000  # spans the study (ms)
    assert {f"gfid/{v}" for v in study["variants"]} <= set(study_run.data.metrics)
    assert "## Claims" in study_run.data.tags["mlflow.note.content"]
    artifacts = {a.path for folder in ("summary", "figures", "notebooks")
                 for a in client.list_artifacts(parent, folder)}
    assert {"summary/summary.md", "summary/summary.csv", "summary/claims.json",
            "figures/fig5_fid.png", "notebooks/variants.html"} <= artifacts
    return [children[name] for name in names]


@pytest.mark.slow
def test_smoke_study_end_to_end_locally(tmp_path, monkeypatch):
    # the smoke study trains for seconds: sample the system metrics every second
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    start = time.perf_counter()
    results = _run_smoke(tmp_path, "-c2")
    elapsed = time.perf_counter() - start
    runs = _check_smoke(results)
    assert all("stage" in r.data.tags for r in runs)
    # training runs carry MLflow's system metrics
    assert all(any(k.startswith("system/cpu_utilization") for k in r.data.metrics) for r in runs)
    print(f"smoke study: {elapsed:.0f} s")


@pytest.mark.slow
@pytest.mark.slurm
@skip_without_slurm
def test_smoke_study_through_the_slurm_profile(tmp_path):
    """The literal `snakemake --profile slurm all` from the repository root: every stage of
    every variant ran as a SLURM job (job ids in the MLflow tags and the rule logs)."""
    results = _run_smoke(tmp_path, "--profile", "slurm", "all", cwd=REPO)
    runs = _check_smoke(results)
    for run in runs:
        for stage in ("train", "sample", "fid", "reconstruct", "nll", "latents"):
            assert run.data.tags.get(f"slurm_job_id.{stage}", "").isdigit(), (run.info.run_name, stage)
    log = (results / "smoke" / "logs" / "simflow" / "s0" / "train.log").read_text()
    assert re.search(r"submitted slurm job \d+", log)
