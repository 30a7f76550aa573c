"""Tests of the analysis notebooks (analysis/*.ipynb), their runner
(workflow/scripts/run_notebook.py) and the Snakemake rule that executes them
(workflow/rules/notebooks.smk).

A small fake study is built in a temporary folder with the workflow's layout
(``results/<study>/<variant>/s<seed>/...``, the summary rule's tables and an MLflow SQLite store
with a parent run and one child run per (variant, seed), made with simflow.tracking). The
notebooks are executed on it with papermill, through the Snakemake rule and directly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import pytest
from helpers_study import write_summary_tables

from simflow.analysis import latent_statistics

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {name: REPO / "analysis" / f"{name}.ipynb" for name in ("latent_space", "variants")}
RULES = REPO / "workflow" / "rules" / "notebooks.smk"
STUDY = "nbtest"
EXPERIMENT = "nbtest-experiment"
SEEDS = (0, 1)
STATS = ("spectral_entropy", "high_frequency_ratio", "total_variation", "autocorrelation")

# Figure cells (by tag) that must show a PNG in each executed notebook, with and without MLflow.
FIGURE_CELLS = {
    "latent_space": ["fig3a", "fig3b", "fig4", "fig4-channels"],
    "variants": ["fig5", "samples"],
}
MLFLOW_FIGURE_CELLS = {"latent_space": [], "variants": ["training-curves"]}

# variant: (group, sigma, posterior label, gFID, smooth latents, PSNR drop per unit noise)
VARIANTS = {
    "simflow": ("latent", 0.5, "fixed σ̄=0.5", 20.0, True, 2.0),
    "frozen_vae": ("latent", None, "learnable", 30.0, False, 12.0),
    "e2e_learnable": ("latent", None, "learnable", 35.0, True, 10.0),
    "simflow_sigma0.25": ("sigma_sweep", 0.25, "fixed σ̄=0.25", 24.0, True, 5.0),
    "tarflow_pixel": ("pixel", None, "none", 50.0, None, None),
}


def _load_run_notebook():
    spec = importlib.util.spec_from_file_location(
        "run_notebook", REPO / "workflow" / "scripts" / "run_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_notebook = _load_run_notebook()


# --------------------------------------------------------------------------------------------
# the fake study
# --------------------------------------------------------------------------------------------
def _latents(rng: np.random.Generator, smooth: bool) -> np.ndarray:
    """(64, 4, 8, 8) latents: spatially correlated (cumulative sums) or white noise."""
    z = rng.standard_normal((64, 4, 8, 8))
    if smooth:
        z = np.cumsum(np.cumsum(z, axis=2), axis=3)
    z[:, 3] = 0.0  # a dead channel: the notebooks must skip it
    return z.astype(np.float32)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_study(root: Path, with_mlflow: bool = True) -> Path:
    """Write a fake finished study under ``root/results``; return the results folder."""
    results = root / "results"
    study_dir = results / STUDY
    rng = np.random.default_rng(0)
    rows, latent_rows, noise_rows = [], [], []
    for variant, (group, sigma, posterior, fid, smooth, drop) in VARIANTS.items():
        for seed in SEEDS:
            unit = study_dir / variant / f"s{seed}"
            latent = smooth is not None
            _write_json(unit / "metrics" / "fid.json", {"fid": fid + seed})
            sweep = (
                [{"noise_std": s, "psnr": 30.0 - drop * s, "mse": 0.01 * (1 + s)}
                 for s in (0.0, 0.5, 1.0)]
                if latent else []
            )
            _write_json(unit / "metrics" / "reconstruct.json",
                        {"rfid": 5.0 if latent else None, "psnr": 30.0 if latent else None,
                         "noise_sweep": sweep, "posterior": posterior})
            _write_json(unit / "metrics" / "nll.json", {"nll_bpd": 1.5})
            _write_json(unit / "train_summary.json",
                        {"steps": 100, "train_time_s": 60.0, "img_per_s": 100.0, "final_loss": 1.0})
            np.savez(unit / "samples.npz", arr_0=_images(rng, 16), arr_1=np.arange(16) % 10)
            if latent:
                z = _latents(rng, smooth)
                np.savez(unit / "latents.npz", mu=z, z=z + 0.5 * rng.standard_normal(z.shape),
                         labels=np.arange(len(z)) % 10)
                np.savez(unit / "interpolation.npz", arr_0=_images(rng, 8))
                stats = latent_statistics(z)
            else:
                np.savez(unit / "latents.npz", not_applicable=True)
                np.savez(unit / "interpolation.npz", arr_0=np.zeros((0, 1, 1, 1), np.uint8),
                         not_applicable=True)
                stats = dict.fromkeys(STATS, math.nan)
            latent_rows.append({"variant": variant, "seed": seed, **stats})
            noise_rows += [{"variant": variant, "seed": seed, "posterior": posterior, **p}
                           for p in sweep]
            rows.append({"variant": variant, "seed": seed, "group": group,
                         "sigma": math.nan if sigma is None else sigma, "posterior": posterior,
                         "kid": (fid + seed + 0.3 * rng.standard_normal()) / 1000,
                         "fid": fid + seed, "rfid": 5.0 if latent else math.nan, "nll_bpd": 1.5,
                         **stats, "train_time_s": 60.0, "img_per_s": 100.0})
    # The summary rule's tables (workflow/rules/analysis.smk).
    write_summary_tables(study_dir, rows, latent_rows, noise_rows,
                         floor={"fid": 2.0, "kid_mean": 0.0001, "kid_std": 0.0001, "num_images": 16})
    if with_mlflow:
        _make_mlflow(results, study_dir)
    return results


def _make_mlflow(results: Path, study_dir: Path) -> None:
    """The store the workflow writes: a parent run, a child run per unit, train curves, gFID."""
    from simflow import tracking

    uri = f"sqlite:///{results.resolve() / 'mlflow.db'}"
    parent = study_dir / "mlflow_parent_run_id.txt"
    tracking.init_study(uri, EXPERIMENT, STUDY, parent)
    for variant, (_, sigma, _, fid, smooth, _) in VARIANTS.items():
        for seed in SEEDS:
            unit = study_dir / variant / f"s{seed}"
            id_file = unit / "mlflow_run_id.txt"
            tracking.init_variant_run(uri, EXPERIMENT, parent, f"{variant}_s{seed}", id_file, variant=variant,
                                      tags={"unit": f"{variant}/s{seed}", "seed": seed})
            with tracking.StageRun(uri, id_file, "train") as run:
                run.log_params_once({"model": {"mode": "pixel" if smooth is None else "end_to_end"},
                                     "vae": {"posterior": "fixed", "fixed_std": sigma},
                                     "train": {"steps": 100, "seed": seed}})
                for step in (25, 50, 75, 100):
                    run.log_metrics({"train/total": 2.0 / step + seed, "train/psnr": 20 + step / 10,
                                     "train/img_per_s": 100.0 + seed}, step)
                run.log_metrics({"train/train_time_s": 60.0})  # one point: not a curve
            with tracking.StageRun(uri, id_file, "fid") as run:
                run.log_metrics({"eval/fid": fid + seed})


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nbstudy")
    make_study(root)
    return root


# --------------------------------------------------------------------------------------------
# helpers on executed notebooks
# --------------------------------------------------------------------------------------------
def _cells_by_tag(nb) -> dict[str, dict]:
    return {tag: cell for cell in nb.cells for tag in cell.metadata.get("tags", [])}


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for cell in nb.cells if cell.cell_type == "code"
        for o in cell.get("outputs", []) if o.get("output_type") == "error"
    ]


def _has_png(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        for mime in ("text/plain", "text/markdown", "text/html"):
            value = o.get("data", {}).get(mime)
            if value:
                parts.append(value if isinstance(value, str) else "".join(value))
    return "".join(parts)


def _check_executed(nb, name: str, with_mlflow: bool) -> dict[str, dict]:
    assert not _errors(nb), f"{name}: error outputs {_errors(nb)}"
    cells = _cells_by_tag(nb)
    expected = FIGURE_CELLS[name] + (MLFLOW_FIGURE_CELLS[name] if with_mlflow else [])
    missing = [tag for tag in expected if not _has_png(cells[tag])]
    assert not missing, f"{name}: no PNG in the cells tagged {missing}"
    # papermill injected the parameters after the tagged cell
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    return cells


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_sources_are_clean_and_parametrised(name):
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == run_notebook.KERNEL_NAME
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    namespace: dict = {}
    exec(params[0].source, namespace)  # noqa: S102 (our own parameters cell)
    assert namespace["results_dir"] == "results"
    assert namespace["tracking_uri"] == "default"
    assert {"study", "analysis"} <= set(namespace)
    # every figure cell the tests look for exists
    tags = {t for c in code for t in c.metadata.get("tags", [])}
    assert set(FIGURE_CELLS[name] + MLFLOW_FIGURE_CELLS[name]) <= tags


def test_parameter_values_parse_like_papermill():
    parse = run_notebook._parse_value
    assert parse("None") is None
    assert parse("demo") == "demo"
    assert parse("3") == 3
    assert parse("{claims: {simflow: sf}}") == {"claims": {"simflow": "sf"}}


@pytest.mark.slow
def test_rule_executes_both_notebooks_with_mlflow(study_root, tmp_path):
    """The Snakemake rule runs both notebooks on the fake study: executed copies with every
    figure (training curves from MLflow included), HTML pages and logs."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(textwrap.dedent(f"""
        from types import SimpleNamespace

        # What workflow/rules/common.smk defines for the real workflow.
        STUDY = SimpleNamespace(
            name="{STUDY}", results_root="results",
            tracking={{"enabled": True, "tracking_uri": None, "experiment": "{EXPERIMENT}"}},
            analysis={{"sweep_reference": "simflow", "grid_images": 8}},
        )
        SD = "results/{STUDY}"
        LOGS = f"{{SD}}/logs"
        ENV = "../envs/simflow.yaml"

        include: "{RULES}"

        rule all:
            input:
                NOTEBOOK_TARGETS,
    """))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(study_root), "-c2", "all"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    out_dir = study_root / "results" / STUDY / "notebooks"
    logs = sorted((study_root / "results" / STUDY / "logs" / "notebooks").glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(p.read_text() for p in logs)
    assert [p.name for p in logs] == ["latent_space.log", "variants.log"]
    for name in NOTEBOOKS:
        nb = nbformat.read(out_dir / f"{name}.ipynb", as_version=4)
        cells = _check_executed(nb, name, with_mlflow=True)
        html = (out_dir / f"{name}.html").read_text()
        assert html.count("data:image/png;base64") >= len(FIGURE_CELLS[name])
        if name == "variants":
            # the provenance table read every child run back, with its gFID from MLflow
            text = _text(cells["provenance"])
            assert "simflow_sigma0.25" in text and "FINISHED" in text
            report = _text(cells["results-vs-paper"])
            assert "## Results" in report and "## Claims" in report
            assert "2.15 (SimFlow" in report  # the published number beside the simflow row
            assert "Holm" in report and "95 % CI [" in report  # the claims' paired intervals
            assert "Real-vs-real floor: 16 real test images" in report
        else:
            assert "fixed" in _text(cells["mlflow-params"])
    assert not list(out_dir.glob("*.failed.ipynb"))


@pytest.mark.slow
def test_notebooks_degrade_gracefully_without_mlflow(study_root, tmp_path):
    """tracking_uri=None (given on the runner's command line): every MLflow section is skipped
    with a message; the figures that come from files are all there."""
    script = REPO / "workflow" / "scripts" / "run_notebook.py"
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(source), str(tmp_path / f"{name}.ipynb"),
             "--html", str(tmp_path / f"{name}.html"),
             "-p", "results_dir", str(study_root / "results"), "-p", "study", STUDY,
             "-p", "tracking_uri", "None"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, source in NOTEBOOKS.items()  # both at once: two kernels, two cores
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        assert nb.metadata.papermill.parameters["tracking_uri"] is None
        cells = _check_executed(nb, name, with_mlflow=False)
        skipped = [c for c in nb.cells if "MLflow sections are skipped" in _text(c)]
        assert skipped, f"{name}: no message about skipping MLflow"
        assert (tmp_path / f"{name}.html").stat().st_size > 0
        if name == "variants":
            assert not _has_png(cells["training-curves"])
            assert "no training curves" in _text(cells["training-curves"])
        else:
            assert not _text(cells["mlflow-params"]).strip()


def test_missing_study_fails_with_a_clear_error(tmp_path):
    """A study without results stops at the first cell with a message saying what to run, and
    the partly executed notebook is kept for inspection."""
    with pytest.raises(RuntimeError, match="does not exist: run the workflow") as info:
        run_notebook.run_notebook(
            NOTEBOOKS["variants"], tmp_path / "out.ipynb",
            parameters={"results_dir": str(tmp_path / "results"), "study": "no_such_study",
                        "tracking_uri": None},
        )
    assert "out.failed.ipynb" in str(info.value)
    assert (tmp_path / "out.failed.ipynb").is_file()
    assert not (tmp_path / "out.ipynb").exists()
