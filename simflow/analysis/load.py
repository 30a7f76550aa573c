"""Loading a finished study's results and building the tables of the analysis notebooks.

The notebooks (``analysis/*.ipynb``) stay thin: each cell calls one of these functions and shows
one table or figure. Everything here reads the files the workflow writes under
``<results_dir>/<study>/`` (the summary rule's tables, each unit's stage outputs, the MLflow run
ids) and tolerates what older or partial results trees lack::

    from simflow.analysis import load

    res = load.open_results("results", "demo")          # fails fast if the study has not run
    res.per_seed, res.noise, res.units, res.first_seed  # tables and unit folders
    load.summary_table(res.per_seed)                    # variants x metrics, "mean ± std"
    load.show(figure)                                   # a matplotlib Figure, inline

No IPython, matplotlib or MLflow is imported at module import; :func:`show` and the MLflow
helpers import what they need when called.
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simflow.analysis.latent_stats import latent_statistics
from simflow.analysis.latent_stats import LATENT_STAT_COLUMNS
from simflow.analysis.summary import aggregate_seeds, claim_status
from simflow.analysis.tables import FLOOR_COLUMNS
from simflow.contracts import RUN_ID_FILE
from simflow.tracking import resolve_tracking_uri

__all__ = [
    "NOISE_COLUMNS",
    "StudyResults",
    "channel_statistics",
    "claims_markdown",
    "claims_table",
    "first_images",
    "first_seeds",
    "latent_scale",
    "latent_stats_summary",
    "latent_stats_table",
    "load_npz",
    "load_per_seed",
    "mean_std",
    "noise_drop_table",
    "noise_table",
    "open_mlflow",
    "open_results",
    "order_by_gfid",
    "provenance_table",
    "read_table",
    "real_floor",
    "require_study",
    "run_params_table",
    "sample_grids",
    "interpolations",
    "show",
    "summary_table",
    "training_curves",
    "unit_dirs",
    "unit_runs",
]

#: Columns of noise_robustness.csv (PSNR under latent noise, Figure 3a).
NOISE_COLUMNS = ["variant", "seed", "posterior", "noise_std", "noise_rel", "latent_std", "psnr", "mse"]

#: Columns of the summary table (:func:`summary_table`), in order, when present.
SUMMARY_COLUMNS = ("group", "sigma", "posterior", "decoder_scale", "collapsed", "kid", "fid", "rfid",
                   "rate_per_dim", "active_fraction", "posterior_std", "nll_bpd", *LATENT_STAT_COLUMNS,
                   "total_updates", "total_train_time_s", "img_per_s")

# --------------------------------------------------------------------------------------------
# the study folder and its tables
# --------------------------------------------------------------------------------------------
def require_study(results_dir: str | Path, study: str) -> Path:
    """``<results_dir>/<study>``, checked to hold the summary rule's ``summary.csv``; raises
    FileNotFoundError with the command that makes it otherwise."""
    study_dir = Path(results_dir) / study
    if not (study_dir / "summary.csv").is_file():
        raise FileNotFoundError(
            f"{study_dir / 'summary.csv'} does not exist: run the workflow for study {study!r} "
            "first (e.g. `snakemake -c2 --configfile config/demo.yaml`), or pass the right "
            "results_dir and study parameters"
        )
    return study_dir


def read_table(study_dir: str | Path, name: str) -> pd.DataFrame | None:
    """The CSV table ``name`` of the study folder, or None when this results tree lacks it."""
    path = Path(study_dir) / name
    return pd.read_csv(path) if path.is_file() else None


def load_per_seed(study_dir: str | Path) -> pd.DataFrame:
    """One row per (variant, seed): ``summary_per_seed.csv``, or ``summary.csv`` (one row per
    variant, seed means) when the per-seed table is absent."""
    table = read_table(study_dir, "summary_per_seed.csv")
    if table is None:
        table = read_table(study_dir, "summary.csv")
    if table is None:
        raise FileNotFoundError(f"{Path(study_dir)} has neither summary_per_seed.csv nor summary.csv")
    return table


def unit_dirs(study_dir: str | Path, per_seed: pd.DataFrame) -> dict[tuple[str, int], Path]:
    """(variant, seed) -> the unit folder ``<study_dir>/<variant>/s<seed>`` of every run, in the
    table's variant order. Without a ``seed`` column the seeds are the ``s<seed>`` folders found."""
    study_dir = Path(study_dir)
    units: dict[tuple[str, int], Path] = {}
    for variant in dict.fromkeys(per_seed["variant"].astype(str)):
        if "seed" in per_seed.columns:
            seeds = per_seed.loc[per_seed["variant"].astype(str) == variant, "seed"].dropna()
            wanted = sorted(int(s) for s in seeds)
        else:
            wanted = sorted(int(p.name[1:]) for p in (study_dir / variant).glob("s*")
                            if p.name[1:].isdigit())
        for seed in wanted:
            units[(variant, seed)] = study_dir / variant / f"s{seed}"
    return units


def first_seeds(units: Iterable[tuple[str, int]]) -> dict[str, int]:
    """variant -> its first seed (the figures of single runs show it)."""
    first: dict[str, int] = {}
    for variant, seed in units:
        first.setdefault(variant, seed)
    return first


def load_npz(path: str | Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` (those present) of an npz, or None when the file is missing or the
    stage marked it ``not_applicable`` (pixel-space variants have no VAE latents)."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as npz:
        if "not_applicable" in npz.files and bool(npz["not_applicable"]):
            return None
        return {k: npz[k] for k in keys if k in npz.files}


def noise_table(study_dir: str | Path, units: Mapping[tuple[str, int], Path]) -> pd.DataFrame:
    """PSNR under latent noise per (variant, seed, noise_std): ``noise_robustness.csv``, or the
    units' ``metrics/reconstruct.json`` when the table is absent (columns :data:`NOISE_COLUMNS`;
    empty when no variant has a latent-noise sweep)."""
    table = read_table(study_dir, "noise_robustness.csv")
    if table is not None:
        return table
    rows = []
    for (variant, seed), unit in units.items():
        path = Path(unit) / "metrics" / "reconstruct.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            for point in rec.get("noise_sweep") or []:
                rows.append({"variant": variant, "seed": seed, "posterior": rec.get("posterior"),
                             "noise_std": point.get("noise_std"), "noise_rel": point.get("noise_rel"),
                             "latent_std": rec.get("latent_std"), "psnr": point.get("psnr"),
                             "mse": point.get("mse")})
    return pd.DataFrame(rows, columns=NOISE_COLUMNS)


@dataclass
class StudyResults:
    """A finished study, loaded: what the notebooks' first cell used to build by hand.

    ``per_seed`` (:func:`load_per_seed`), ``variants`` (in table order), ``units``
    (:func:`unit_dirs`), ``first_seed`` (:func:`first_seeds`), ``noise`` (:func:`noise_table`)
    and ``claim_names`` (the study config's ``analysis.claims``: role -> variant name, for
    :func:`simflow.analysis.evaluate_claims`)."""

    study: str
    study_dir: Path
    per_seed: pd.DataFrame
    variants: list[str]
    units: dict[tuple[str, int], Path]
    first_seed: dict[str, int]
    noise: pd.DataFrame
    analysis: dict[str, Any] = field(default_factory=dict)

    @property
    def claim_names(self) -> dict[str, str]:
        return dict(self.analysis.get("claims") or {})

    @property
    def floor(self) -> dict[str, Any] | None:
        """The real-vs-real floor (``fid``, ``kid_mean``, ``kid_std``, ``num_images``) from
        summary.csv's floor columns, or None for a study without the fid-floor stage."""
        return real_floor(self.study_dir)

    def first_unit(self, variant: str) -> Path:
        """The unit folder of ``variant``'s first seed."""
        return self.units[(variant, self.first_seed[variant])]

    def describe(self) -> str:
        return (f"study {self.study!r}: {len(self.variants)} variants, {len(self.units)} runs "
                f"(variant x seed), results in {self.study_dir}")


def open_results(results_dir: str | Path, study: str,
                 analysis: Mapping[str, Any] | None = None) -> StudyResults:
    """Load study ``study`` under ``results_dir`` (raises FileNotFoundError, naming the command
    to run, when the study has no summary yet). ``analysis`` is the study config's ``analysis``
    section (the notebooks' papermill parameter; {} or None: the defaults)."""
    study_dir = require_study(results_dir, study)
    per_seed = load_per_seed(study_dir)
    units = unit_dirs(study_dir, per_seed)
    return StudyResults(study=study, study_dir=study_dir, per_seed=per_seed,
                        variants=list(dict.fromkeys(per_seed["variant"].astype(str))),
                        units=units, first_seed=first_seeds(units),
                        noise=noise_table(study_dir, units), analysis=dict(analysis or {}))


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def mean_std(mean: float, std: float, n: int) -> str:
    """'mean ± std' over seeds, 4 significant digits ('–' when missing; no spread for one seed)."""
    if mean is None or not np.isfinite(mean):
        return "–"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if n > 1 and std is not None and np.isfinite(std) else "")


def summary_table(per_seed: pd.DataFrame, columns: Sequence[str] = SUMMARY_COLUMNS) -> pd.DataFrame:
    """One row per variant (index), sorted by gFID (best first): ``n_seeds``, the labels (group,
    posterior) and every numeric column of ``columns`` as 'mean ± std' over seeds (σ̄ without a
    spread: it is a setting)."""
    present = [c for c in columns if c in per_seed.columns]
    keep = ["variant"] + (["seed"] if "seed" in per_seed.columns else []) + present
    table = aggregate_seeds(per_seed[keep])
    out = table[["variant", "n_seeds"] + [c for c in ("group", "posterior") if c in table]].copy()
    for c in present:
        if f"{c}_mean" in table:
            spread = table[f"{c}_std"] if c != "sigma" else pd.Series(np.nan, index=table.index)
            out[c] = [mean_std(m, s, n) for m, s, n in
                      zip(table[f"{c}_mean"], spread, table["n_seeds"], strict=True)]
    order = (np.argsort(table["fid_mean"].to_numpy(float), kind="stable") if "fid_mean" in table
             else np.arange(len(table)))
    return out.iloc[order].set_index("variant")


def order_by_gfid(per_seed: pd.DataFrame) -> pd.DataFrame:
    """``per_seed`` with its variants ordered by mean gFID (best first, missing last)."""
    order = per_seed.groupby("variant", sort=False)["fid"].mean().sort_values(na_position="last").index
    return per_seed.set_index("variant").loc[list(order)].reset_index()


def latent_scale(unit: str | Path) -> dict[str, float]:
    """Std of the posterior means (``mu_std``) and of the sampled latents (``z_std``) in a unit's
    ``latents.npz`` (NaN when it has none)."""
    arrays = load_npz(Path(unit) / "latents.npz", ["mu", "z"])
    out = {"mu_std": math.nan, "z_std": math.nan}
    for key, value in (arrays or {}).items():
        out[f"{key}_std"] = float(np.std(value))
    return out


def noise_drop_table(noise: pd.DataFrame, res: StudyResults | None = None) -> pd.DataFrame:
    """Per variant (index, sorted by the drop): the posterior, mean PSNR at the lowest and the
    highest noise std, ``drop (dB)`` between them and, with ``res``, the latents' scale of the
    first seed (:func:`latent_scale`). Empty when ``noise`` is."""
    if noise.empty:
        return pd.DataFrame(columns=["posterior", "drop (dB)"])
    levels = sorted(noise["noise_std"].dropna().unique())
    low, high = levels[0], levels[-1]
    at = noise.groupby(["variant", "noise_std"], sort=False)["psnr"].mean().unstack()
    drop = pd.DataFrame({
        "posterior": noise.groupby("variant", sort=False)["posterior"].first(),
        f"PSNR @ {low:g}": at[low],
        f"PSNR @ {high:g}": at[high],
        "drop (dB)": at[low] - at[high],
    })
    if res is not None:
        scales = {v: latent_scale(res.first_unit(v)) if v in res.first_seed else
                  {"mu_std": math.nan, "z_std": math.nan} for v in drop.index}
        drop = drop.join(pd.DataFrame(scales).T)
    return drop.sort_values("drop (dB)")


def latent_stats_table(study_dir: str | Path, per_seed: pd.DataFrame) -> pd.DataFrame:
    """``per_seed`` with the four latent statistics of Figure 4: its own columns, or merged in
    from ``latent_stats.csv`` when the summary table lacks them (older results trees)."""
    if any(c in per_seed.columns for c in LATENT_STAT_COLUMNS):
        return per_seed
    stats = read_table(study_dir, "latent_stats.csv")
    if stats is None:
        return per_seed
    keys = [c for c in ("variant", "seed") if c in stats.columns and c in per_seed.columns]
    return per_seed.merge(stats, on=keys, how="left")


def latent_stats_summary(stats_table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the latent statistics, one row per variant (index)."""
    present = [c for c in LATENT_STAT_COLUMNS if c in stats_table.columns]
    keep = ["variant"] + (["seed"] if "seed" in stats_table.columns else []) + present
    return aggregate_seeds(stats_table[keep]).set_index("variant")


def channel_statistics(res: StudyResults, max_latents: int = 256
                       ) -> tuple[pd.DataFrame, dict[tuple[str, str], int]]:
    """The latent statistics per channel of each variant's first seed, for the posterior means
    (``latents`` = "mu") and the sampled latents ("z"): a long table (variant, latents, channel,
    statistic, value) over the first ``max_latents`` images, and the number of constant ("dead")
    channels skipped per (variant, latents)."""
    rows, dead = [], {}
    for variant in res.first_seed:
        arrays = load_npz(res.first_unit(variant) / "latents.npz", ["mu", "z"])
        for key, z in (arrays or {}).items():
            z = np.asarray(z[:max_latents], dtype=np.float64)
            for c in range(z.shape[1]):
                try:
                    stats = latent_statistics(z[:, c: c + 1])
                except ValueError:  # every map of this channel is constant
                    dead[(variant, key)] = dead.get((variant, key), 0) + 1
                    continue
                rows += [{"variant": variant, "latents": key, "channel": c, "statistic": name,
                          "value": value} for name, value in stats.items()]
    return pd.DataFrame(rows, columns=["variant", "latents", "channel", "statistic", "value"]), dead


def real_floor(study_dir: str | Path) -> dict[str, Any] | None:
    """The real-vs-real floor of a study (summary.csv's :data:`~simflow.analysis.tables.FLOOR_COLUMNS`,
    under the fid-floor stage's keys), or None when summary.csv has no finite floor."""
    table = read_table(study_dir, "summary.csv")
    if table is None or "fid_floor" not in table.columns or table.empty:
        return None
    row = table.iloc[0]
    floor = {key: float(row[col]) for col, key in FLOOR_COLUMNS.items() if col in table.columns}
    return floor if math.isfinite(floor.get("fid", math.nan)) else None


def claims_table(claims: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per claim (index: its id): the verdict, the metric and the paired difference it
    is decided on, the number of paired seeds, the mean difference with its 95 % t-interval, the
    Holm-corrected interval (with its level), and the raw and Holm-adjusted p-values; "–" where
    a number does not exist (one seed, a missing variant)."""
    def num(x: Any, fmt: str = "{:.3g}") -> str:
        return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "–"

    def interval(lo: Any, hi: Any) -> str:
        return f"[{num(lo)}, {num(hi)}]" if num(lo) != "–" else "–"

    rows = []
    for c in claims:
        if ids is not None and c["id"] not in ids:
            continue
        level = c.get("holm_confidence")
        rows.append({"claim": c["id"], "verdict": claim_status(c), "metric": c.get("metric") or "–",
                     "difference": f"{c.get('difference') or '–'} (predicted {c.get('predicted') or '–'})",
                     "n": c.get("n") if c.get("n") is not None else "–",
                     "mean diff": num(c.get("mean_diff")),
                     "95 % CI": interval(c.get("ci_low"), c.get("ci_high")),
                     "Holm CI": interval(c.get("ci_holm_low"), c.get("ci_holm_high"))
                     + (f" ({100 * level:.1f} %)" if isinstance(level, float) else ""),
                     "p": num(c.get("p")), "p (Holm)": num(c.get("p_holm"))})
    return pd.DataFrame(rows).set_index("claim") if rows else pd.DataFrame()


def claims_markdown(claims: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None) -> str:
    """Markdown list of the claims (those with an id in ``ids``, or all): status in bold, the
    claim, and its evidence."""
    lines = [f"* **{claim_status(c)}**: {c['claim']}  \n"
             + (f"  Why invalid: {c['invalid']}  \n" if c.get("invalid") else "")
             + f"  Evidence: {c['evidence']}" for c in claims if ids is None or c["id"] in ids]
    return "\n".join(lines)


def interpolations(res: StudyResults) -> dict[str, np.ndarray]:
    """variant -> the decoded interpolation images (N, H, W, C) of its first seed, for the
    variants that have them (Figure 3b; pixel-space variants have none)."""
    out = {}
    for variant in res.first_seed:
        arrays = load_npz(res.first_unit(variant) / "interpolation.npz", ["arr_0"])
        if arrays and arrays["arr_0"].shape[0] > 0:
            out[variant] = arrays["arr_0"]
    return out


def first_images(path: str | Path, k: int) -> np.ndarray:
    """The first ``k`` images of ``arr_0`` in an ADM-style samples.npz, reading only those bytes
    (a full-scale file holds 50 000 images of 256 x 256 x 3: far too many to load for a grid)."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        shape, fortran, dtype = read_header(fh)
        if fortran or len(shape) != 4:
            raise ValueError(f"{path}: arr_0 must be a C-ordered (N, H, W, C) array, got {shape}")
        k = min(k, shape[0])
        count = k * int(np.prod(shape[1:]))
        data = fh.read(count * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype, count=count).reshape(k, *shape[1:])


def sample_grids(res: StudyResults, k: int = 32) -> dict[str, np.ndarray]:
    """variant -> the first ``k`` samples of its first seed (``samples.npz``), for those that
    have samples."""
    out = {}
    for variant in res.first_seed:
        path = res.first_unit(variant) / "samples.npz"
        if path.is_file():
            out[variant] = first_images(path, k)
    return out


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------
def open_mlflow(tracking_uri: str | None, results_dir: str | Path) -> Any | None:
    """An ``MlflowClient`` on the study's store, or None (the reason printed) to skip the MLflow
    sections: ``tracking_uri`` None (tracking off), or a SQLite store file that does not exist
    (MLflow would create an empty one). ``"default"`` resolves as the stages do
    (``$MLFLOW_TRACKING_URI``, else ``sqlite:///<results_dir>/mlflow.db``)."""
    if tracking_uri is None:
        print("tracking_uri is None: the MLflow sections are skipped.")
        return None
    uri = resolve_tracking_uri(None if tracking_uri == "default" else tracking_uri, results_dir)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.is_file():
            print(f"no MLflow database at {db}: the MLflow sections are skipped.")
            return None
    # MLflow imports tqdm.auto, which warns in a kernel without ipywidgets; nothing to act on.
    warnings.filterwarnings("ignore", message="IProgress not found")
    # lazy: mlflow costs ~1.8 CPU-s; only the notebooks' MLflow sections need it
    from mlflow import MlflowClient

    print(f"MLflow store: {uri}")
    return MlflowClient(tracking_uri=uri)


def unit_runs(client: Any | None, units: Mapping[tuple[str, int], Path]) -> dict[tuple[str, int], Any]:
    """(variant, seed) -> the MLflow run named by the unit's ``mlflow_run_id.txt`` (written by the
    workflow's setup rule); units without a file or run are listed in one printed line. {} for
    ``client=None``."""
    if client is None:
        return {}
    # lazy: mlflow costs ~1.8 CPU-s; only the notebooks' MLflow sections need it
    from mlflow.exceptions import MlflowException

    found, missing = {}, []
    for key, unit in units.items():
        id_file = Path(unit) / RUN_ID_FILE
        if not id_file.is_file():
            missing.append(f"{key[0]}/s{key[1]}")
            continue
        try:
            found[key] = client.get_run(id_file.read_text().strip())
        except MlflowException as err:
            missing.append(f"{key[0]}/s{key[1]} ({err.error_code})")
    if missing:
        print("no MLflow run for:", ", ".join(missing))
    return found


def run_params_table(runs: Mapping[tuple[str, int], Any], keys: Sequence[str]) -> pd.DataFrame:
    """One row per (variant, seed) (index): the short run id and the MLflow params ``keys``
    ('–' where a run lacks one)."""
    rows = [{"variant": v, "seed": s, "run": run.info.run_id[:8],
             **{k: run.data.params.get(k, "–") for k in keys}} for (v, s), run in runs.items()]
    return pd.DataFrame(rows, columns=["variant", "seed", "run", *keys]).set_index(["variant", "seed"])


def training_curves(client: Any | None, runs: Mapping[tuple[str, int], Any],
                    prefix: str = "train/") -> pd.DataFrame:
    """The metric histories (variant, seed, metric, step, value) of the runs' metrics starting
    with ``prefix``; metrics logged at a single step (e.g. the final train time) are no curves
    and are left out."""
    history = []
    for (variant, seed), run in runs.items():
        for key in sorted(run.data.metrics):
            if key.startswith(prefix):
                history += [{"variant": variant, "seed": seed, "metric": key, "step": m.step,
                             "value": m.value} for m in client.get_metric_history(run.info.run_id, key)]
    curves = pd.DataFrame(history, columns=["variant", "seed", "metric", "step", "value"])
    n_steps = curves.groupby("metric")["step"].nunique()
    return curves[curves["metric"].isin(n_steps[n_steps > 1].index)].reset_index(drop=True)


def provenance_table(runs: Mapping[tuple[str, int], Any], per_seed: pd.DataFrame | None = None
                     ) -> pd.DataFrame:
    """Per run ((variant, seed) index): status, code version, where training ran (MLflow tags) and
    the gFID MLflow holds, beside the summary table's gFID when ``per_seed`` has seeds (they must
    agree)."""
    rows = []
    for (variant, seed), run in runs.items():
        tags, metrics = run.data.tags, run.data.metrics
        row = {"variant": variant, "seed": seed, "run": run.info.run_id[:8],
               "status": run.info.status, "git_commit": tags.get("git_commit", "–")[:10],
               "git_dirty": tags.get("git_dirty", "–"),
               "train job": tags.get("slurm_job_id.train") or tags.get("job_id.train") or "–",
               "train host": tags.get("host.train", "–"),
               "gFID (MLflow)": metrics.get("eval/fid", math.nan)}
        if per_seed is not None and "seed" in per_seed.columns:
            match = per_seed[(per_seed["variant"] == variant) & (per_seed["seed"] == seed)]
            row["gFID (summary)"] = float(match["fid"].iloc[0]) if len(match) else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index(["variant", "seed"]) if rows else pd.DataFrame()


# --------------------------------------------------------------------------------------------
# display
# --------------------------------------------------------------------------------------------
def show(fig: Any, dpi: int = 110) -> None:
    """Display a matplotlib Figure as an inline PNG, whatever the kernel's plotting backend."""
    # lazy: IPython is there only in a notebook kernel
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))
