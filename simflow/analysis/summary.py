"""Tables and claim checks for a finished study.

Inputs are the per-study tables written by the evaluation stages (``results/<study>/``):

* the **summary table**: one row per variant (or per ``(variant, seed)`` when several seeds were
  run) with columns ``variant, group, fid, rfid, nll_bpd, sigma, spectral_entropy,
  high_frequency_ratio, total_variation, autocorrelation, train_time_s, img_per_s`` and optionally
  ``seed``. ``fid``/``rfid`` are FID scores (lower is better), ``nll_bpd`` is bits per dimension,
  ``sigma`` is the fixed posterior std sigma-bar (NaN where it does not apply);
* the **noise-robustness table**: ``variant, posterior, noise_std, psnr, mse`` (PSNR in dB of the
  reconstruction after adding Gaussian noise of std ``noise_std`` to the latents), optionally
  with ``seed``.

The published numbers in :data:`PAPER_RESULTS` are full-scale ImageNet results; a study run at
a smaller scale is not expected to match them, and the Markdown report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from simflow.analysis.latent_stats import BY_NAME, LATENT_STAT_COLUMNS, STATISTICS
from simflow.analysis.stats import ALPHA, PairedTest, holm, holm_confidence, paired_t, t_interval

__all__ = [
    "PAPER_RESULTS",
    "DEFAULT_PAPER_MAPPING",
    "LATENT_STAT_COLUMNS",
    "aggregate_seeds",
    "results_markdown",
    "evaluate_claims",
    "claim_status",
    "collapsed_seeds",
    "PROTOCOL",
    "CLAIMS_PROTOCOL",
    "ONE_SEED",
    "VERDICTS",
]


#: Published numbers, keyed by the model name used in the papers. ``fid`` is the class-conditional
#: generation FID with guidance as reported in the abstracts (SimFlow arXiv abstract; TarFlow
#: paper for the pixel-space ImageNet-64 number).
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "SimFlow": {"metric": "gFID", "value": 2.15, "dataset": "ImageNet 256x256"},
    "SimFlow + REPA-E": {"metric": "gFID", "value": 1.91, "dataset": "ImageNet 256x256"},
    "STARFlow": {"metric": "gFID", "value": 2.40, "dataset": "ImageNet 256x256"},
    "TarFlow": {"metric": "FID", "value": 2.90, "dataset": "ImageNet 64x64 (pixel space)"},
}

#: Study variant name -> key of :data:`PAPER_RESULTS`. ``frozen_encoder_noise`` (frozen encoder,
#: noise-augmented latents, decoder fine-tuned) is the study's STARFlow-like variant.
DEFAULT_PAPER_MAPPING: dict[str, str] = {
    "simflow": "SimFlow",
    "simflow_repa": "SimFlow + REPA-E",
    "frozen_encoder_noise": "STARFlow",
    "tarflow_pixel": "TarFlow",
}

# Columns shown in the Markdown table: (column, header, number format). The rate columns sit
# beside rFID and the latent statistics, so that smoothness of an uninformative latent is never
# read on its own.
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("sigma", "σ̄", "{:g}"),
    ("kid", "gKID", "{:.4f}"),
    ("fid", "gFID", "{:.2f}"),
    ("rfid", "rFID", "{:.2f}"),
    ("rate_per_dim", "rate (nats/dim)", "{:.3f}"),
    ("active_fraction", "active dims", "{:.2f}"),
    ("posterior_std", "posterior σ", "{:.3f}"),
    ("nll_bpd", "NLL (bpd, own latent space)", "{:.3f}"),
    *((stat.name, stat.label, "{:.3f}") for stat in STATISTICS),
    ("total_updates", "updates", "{:.0f}"),
    ("total_train_pflops", "train PFLOP", "{:.4f}"),
    ("total_train_time_s", "train time (s)", "{:.0f}"),
    ("img_per_s", "img/s", "{:.1f}"),
)

#: How the table's compute columns are counted (the fair-compute protocol), printed above it.
PROTOCOL = (
    "Compute: `updates` counts every optimisation step a variant's models received, at the same "
    "global batch: a frozen variant's VAE pre-training steps plus its flow steps; an end-to-end "
    "variant's joint steps. End-to-end variants at equal *flow* steps have fewer updates than the "
    "frozen ones; `*_equal_updates` variants are end-to-end at equal *total* updates, which is not "
    "equal compute. `train PFLOP` is the counted training compute of those updates (forward + "
    "backward, simflow.flops), the VAE pre-training's included; `*_compute_matched` variants are "
    "end-to-end at the frozen pipeline's FLOPs. `train time` is the wall-clock of those updates "
    "(the VAE pre-training's included, gFID probes excluded), which drifts with the machine. "
    "`rate` is the flow NLL's gap above the posterior-entropy floor (the prior KL), `active dims` the "
    "fraction of latent dims whose mean varies across images (simflow.rate)."
)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(df.columns)}")


def aggregate_seeds(df: pd.DataFrame, by: str | Sequence[str] = "variant") -> pd.DataFrame:
    """Mean and spread over seeds of every numeric column, one row per ``by`` group.

    Args:
        df: a table with one row per ``(variant, seed)`` (or one row per variant).
        by: the grouping column(s).

    Returns:
        A DataFrame with the ``by`` column(s), ``n_seeds`` (rows in the group), and for every
        numeric column ``m`` other than ``by`` and ``seed``: ``m_mean`` (NaN-skipping mean) and
        ``m_std`` (sample std, ddof=1, over the non-NaN values; NaN with fewer than two).
        Non-numeric columns that are constant within every group (e.g. ``group``) are kept as
        they are. Groups keep their order of first appearance.
    """
    keys = [by] if isinstance(by, str) else list(by)
    _require_columns(df, keys, "the table to aggregate")
    skip = set(keys) | {"seed"}
    numeric = [
        c
        for c in df.columns
        if c not in skip
        and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
    ]
    grouped = df.groupby(keys, sort=False, dropna=False)
    # Labels that do not vary within a group (e.g. "group") are carried along; others dropped.
    labels = [
        c
        for c in df.columns
        if c not in skip
        and c not in numeric
        and bool((grouped[c].nunique(dropna=False) <= 1).all())
    ]
    parts: dict[str, pd.Series] = {c: grouped[c].first() for c in labels}
    parts["n_seeds"] = grouped.size()
    for col in numeric:
        parts[f"{col}_mean"] = grouped[col].mean()
        parts[f"{col}_std"] = grouped[col].std(ddof=1)
    return pd.DataFrame(parts).reset_index()


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _finite_or_str(x: Any) -> bool:
    """True for a usable label: a non-empty string or a finite number."""
    if isinstance(x, str):
        return bool(x)
    return _finite(x)


def _fmt(mean: Any, std: Any, n: int, fmt: str) -> str:
    if not _finite(mean):
        return "–"
    text = fmt.format(float(mean))
    if n > 1 and _finite(std):
        text += " ± " + fmt.format(float(std))
    return text


def _note(row: pd.Series, collapsed: str = "") -> str:
    """The note column: a collapsed encoder, or why latent statistics are absent."""
    if collapsed:
        return f"**collapsed encoder** ({collapsed}): latent statistics and gFID describe an uninformative latent"
    if str(row.get("group", "")).lower() == "pixel":
        return "no VAE latent"
    present = [c for c in LATENT_STAT_COLUMNS if f"{c}_mean" in row.index]
    if present and not any(_finite(row[f"{c}_mean"]) for c in present):
        return "latent statistics missing"
    return ""


def _paper_cell(variant: str, mapping: Mapping[str, str]) -> str:
    key = mapping.get(variant)
    if key is None:
        return "–"
    if key not in PAPER_RESULTS:
        raise ValueError(
            f"paper mapping sends variant {variant!r} to {key!r}, which is not in PAPER_RESULTS "
            f"({list(PAPER_RESULTS)})"
        )
    ref = PAPER_RESULTS[key]
    return f"{ref['value']:.2f} ({key}, {ref['metric']}, {ref['dataset']})"


def claim_status(claim: Mapping[str, Any]) -> str:
    """The verdict of one claim dict (:data:`VERDICTS`); a claims.json written before verdicts
    existed reads as reproduced / not reproduced / inconclusive / invalid."""
    if claim.get("verdict"):
        return str(claim["verdict"])
    if claim.get("invalid"):
        return "invalid"
    if claim["reproduced"] is None:
        return "inconclusive"
    return "reproduced" if claim["reproduced"] else "not reproduced"


def _is_true(value: Any) -> bool:
    """A collapse flag as written ("true") or as read back from CSV (True)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true") or (
        isinstance(value, (bool, np.bool_)) and bool(value))


def collapsed_seeds(df: pd.DataFrame, variant: str) -> str:
    """"" when no seed of ``variant`` collapsed, else e.g. "2 of 3 seeds, rate 0.018 nats/dim"."""
    if "collapsed" not in df.columns:
        return ""
    rows = df[df["variant"] == variant]
    flags = [_is_true(v) for v in rows["collapsed"]]
    if not any(flags):
        return ""
    text = f"{sum(flags)} of {len(flags)} seed{'s' if len(flags) > 1 else ''}"
    if "rate_per_dim" in rows.columns:
        rate = pd.to_numeric(rows["rate_per_dim"], errors="coerce")[np.asarray(flags)]
        if rate.notna().any():
            text += f", rate {rate.mean():.3g} nats/dim"
    if "collapse_alarm_reason" in rows.columns:
        reasons = [str(r) for r in rows["collapse_alarm_reason"][np.asarray(flags)]
                   if isinstance(r, str) and r.strip()]
        if reasons:
            text += "; alarm: " + "; ".join(dict.fromkeys(reasons))
    return text


def floor_sentence(floor: Mapping[str, Any] | None) -> str:
    """The real-vs-real floor in words ("" without one): what FID and KID give real test images
    against the reference, at the generated samples' count, i.e. the metrics' small-sample bias."""
    if not floor or not _finite(floor.get("fid")):
        return ""
    kid = ""
    if _finite(floor.get("kid_mean")):
        kid = f", KID {float(floor['kid_mean']):.4f}"
        if _finite(floor.get("kid_std")):
            kid += f" ± {float(floor['kid_std']):.4f} (std over subsets)"
    count = f"{int(floor['num_images'])} " if _finite(floor.get("num_images")) else ""
    return (f"Real-vs-real floor: {count}real {floor.get('split', 'test')} images "
            f"against the reference give FID {float(floor['fid']):.2f}{kid}, at the generated samples' "
            "count: the FID a perfect model would get here (its small-sample bias). KID is unbiased, "
            "so its floor is near 0.")


def results_markdown(
    df: pd.DataFrame,
    claims: Sequence[Mapping[str, Any]],
    mapping: Mapping[str, str] | None = None,
    floor: Mapping[str, Any] | None = None,
) -> str:
    """Render the study's results and the claim checks as Markdown.

    Args:
        df: the summary table (one row per variant, or per ``(variant, seed)``).
        claims: dicts with keys ``claim`` (str), ``reproduced`` (True, False or None) and
            ``evidence`` (str), e.g. the output of :func:`evaluate_claims`.
        mapping: study variant -> :data:`PAPER_RESULTS` key; defaults to
            :data:`DEFAULT_PAPER_MAPPING`.
        floor: the fid-floor stage's real-vs-real FID/KID (a sentence under the table), or None.

    Returns:
        A Markdown document: a results table (``mean ± std`` when a variant has several seeds,
        "–" for missing values) with the published number beside each mapped variant and a note
        column ("no VAE latent" for pixel-space variants), then a "Claims" section.
    """
    _require_columns(df, ["variant"], "the summary table")
    mapping = DEFAULT_PAPER_MAPPING if mapping is None else mapping
    df = df.copy()
    for c, _, _ in _TABLE_COLUMNS:
        if c in df.columns:
            # An all-missing column read from CSV/JSON may be object dtype; keep it numeric.
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    agg = aggregate_seeds(df, by="variant")
    shown = [(c, h, f) for c, h, f in _TABLE_COLUMNS if f"{c}_mean" in agg.columns]

    header = (
        ["variant", "group", "seeds"] + [h for _, h, _ in shown] + ["paper (published)", "note"]
    )
    lines = [
        "## Results",
        "",
        "Published numbers are the papers' full-scale ImageNet results, shown for reference; "
        "a smaller-scale study is not expected to match them. Values are mean ± std over seeds "
        "where several seeds were run; – marks a missing value. gKID is the generated samples' "
        "KID (unbiased at small sample counts), gFID their FID. The flow's NLL is in each variant's "
        "own latent space (pixels for a pixel-space variant): variants with different latents are "
        "not comparable on it.",
        "",
        PROTOCOL,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(shown) + ["---", "---"]) + "|",
    ]
    for _, row in agg.iterrows():
        n = int(row["n_seeds"])
        group = row.get("group")
        cells = [str(row["variant"]), str(group) if _finite_or_str(group) else "–", str(n)]
        # sigma is a setting, not a measurement: no "± 0" spread for it.
        cells += [
            _fmt(row[f"{c}_mean"], row.get(f"{c}_std"), 1 if c == "sigma" else n, f)
            for c, _, f in shown
        ]
        cells.append(_paper_cell(str(row["variant"]), mapping))
        cells.append(_note(row, collapsed_seeds(df, str(row["variant"]))))
        lines.append("| " + " | ".join(cells) + " |")

    if floor_sentence(floor):
        lines += ["", floor_sentence(floor)]
    lines += ["", "## Claims", "", CLAIMS_PROTOCOL, ""]
    if not claims:
        lines.append("No claims were evaluated.")
    for i, claim in enumerate(claims, start=1):
        missing = [k for k in ("claim", "reproduced", "evidence") if k not in claim]
        if missing:
            raise ValueError(f"claim #{i} is missing key(s) {missing}; got {sorted(claim)}")
        if claim["reproduced"] not in (True, False, None):
            raise ValueError(
                f"claim #{i}: 'reproduced' must be True, False or None, got {claim['reproduced']!r}"
            )
        status = claim_status(claim)
        lines.append(f"{i}. **{status}**: {claim['claim']}  ")
        if claim.get("invalid"):
            lines.append(f"   Why invalid: {claim['invalid']}  ")
        lines.append(f"   Evidence: {claim['evidence']}")
    return "\n".join(lines) + "\n"


# --- claims --------------------------------------------------------------------------------------

#: A claim's verdict with one seed per variant: a point estimate, never a verdict.
ONE_SEED = "point estimate (one seed)"
#: Every verdict a claim can get.
VERDICTS: tuple[str, ...] = ("reproduced", "refuted", "inconclusive", ONE_SEED, "invalid")

#: How the claims are decided (printed above them in summary.md).
CLAIMS_PROTOCOL = (
    "Each claim is a paired comparison over seeds (variants with the same seed share data order, "
    "labels and sampling noise): the mean of the per-seed differences, its 95 % t-interval and "
    "the two-sided paired t-test's p-value, Holm-corrected across the claims decided here "
    f"(family-wise error rate {ALPHA:g}). A claim is **reproduced** or **refuted** only when its "
    "Holm-corrected interval excludes zero (on the claimed or the opposite side), otherwise it is "
    f"**inconclusive**; with one seed the difference is a **{ONE_SEED}**, never a verdict. gFID "
    "claims are decided on KID (unbiased at small sample counts), FID beside it."
)


def _per_seed_values(df: pd.DataFrame, variant: str, column: str) -> pd.Series | str:
    """``column`` of ``variant`` indexed by seed (finite values only), or why it is unavailable."""
    if column not in df.columns:
        return f"column {column!r} not in the summary table"
    rows = df[df["variant"] == variant]
    if rows.empty:
        return f"variant {variant} not in this study"
    seeds = rows["seed"].to_numpy() if "seed" in rows.columns else np.zeros(len(rows), dtype=int)
    if len(set(seeds.tolist())) != len(seeds):
        raise ValueError(f"the summary table has several rows for one seed of variant {variant} "
                         f"(seeds {sorted(seeds.tolist())}); it must have one row per (variant, seed)")
    values = pd.Series(pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float), index=seeds)
    values = values[np.isfinite(values)]
    if values.empty:
        return f"{column} is missing (NaN) for {variant}"
    return values.sort_index()


@dataclass
class _Measure:
    """One paired comparison of a claim: ``a - b`` per seed, predicted to have sign ``sign``."""

    label: str
    a: str
    b: str
    sign: int
    fmt: str
    a_values: pd.Series
    b_values: pd.Series
    dropped: dict[str, list[int]]
    test: PairedTest

    @property
    def diffs(self) -> np.ndarray:
        return (self.a_values - self.b_values).to_numpy(dtype=float)


def _measure(label: str, a: str, b: str, a_values: pd.Series, b_values: pd.Series, sign: int,
             fmt: str) -> _Measure | str:
    """Pair the two variants' per-seed values by seed; seeds present on one side only are dropped."""
    common = sorted(set(a_values.index) & set(b_values.index))
    dropped = {v: sorted(int(s) for s in set(vals.index) - set(common))
               for v, vals in ((a, a_values), (b, b_values))}
    dropped = {v: s for v, s in dropped.items() if s}
    if not common:
        return (f"{label}: no seed has both {a} (seeds {sorted(map(int, a_values.index))}) and {b} "
                f"(seeds {sorted(map(int, b_values.index))})")
    av, bv = a_values.loc[common], b_values.loc[common]
    return _Measure(label, a, b, sign, fmt, av, bv, dropped, paired_t((av - bv).to_numpy(dtype=float)))


def _column_measure(df: pd.DataFrame, label: str, column: str, a: str, b: str, sign: int,
                    fmt: str) -> _Measure | str:
    values = [_per_seed_values(df, v, column) for v in (a, b)]
    for v in values:
        if isinstance(v, str):
            return v
    return _measure(label, a, b, values[0], values[1], sign, fmt)


def _none_if_nan(x: Any) -> float | None:
    return float(x) if _finite(x) else None


def _measure_record(m: _Measure, confidence: float | None) -> dict[str, Any]:
    """A measure's numbers for claims.json: raw 95 % interval and the Holm-adjusted one."""
    t = m.test
    holm_ci = (t_interval(m.diffs, confidence) if confidence is not None and t.n > 1 else (None, None))
    return {
        "metric": m.label, "difference": f"{m.a} - {m.b}", "predicted": "< 0" if m.sign < 0 else "> 0",
        "n": t.n, "seeds": [int(s) for s in m.a_values.index], "dropped_seeds": m.dropped,
        "mean_a": float(m.a_values.mean()), "mean_b": float(m.b_values.mean()),
        "mean_diff": t.mean_diff, "std_diff": t.std_diff, "ci_low": t.ci_low, "ci_high": t.ci_high,
        "p": t.p, "ci_holm_low": _none_if_nan(holm_ci[0]), "ci_holm_high": _none_if_nan(holm_ci[1]),
    }


def _measure_text(m: _Measure, rec: Mapping[str, Any], confidence: float | None, family: int) -> str:
    f = m.fmt.format
    text = f"{m.label}: {m.a} {f(rec['mean_a'])} vs {m.b} {f(rec['mean_b'])}"
    if m.test.n == 1:
        text += f" (one seed, {m.a} − {m.b} = {f(m.test.mean_diff)}: a point estimate, no test)"
    else:
        text += (f" (means over {m.test.n} paired seeds); {m.a} − {m.b} = {f(m.test.mean_diff)}, "
                 f"95 % CI [{f(m.test.ci_low)}, {f(m.test.ci_high)}], p = {m.test.p:.3g}")
        if confidence is not None:
            text += (f"; Holm-corrected over {family} claims: {100 * confidence:.1f} % CI "
                     f"[{f(rec['ci_holm_low'])}, {f(rec['ci_holm_high'])}]")
    if m.dropped:
        text += "; left out, no paired seed: " + ", ".join(
            f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))} of {v}" for v, s in m.dropped.items())
    return text


@dataclass
class _PendingClaim:
    """A claim before the Holm correction: its measures, or why it cannot be tested."""

    claim: str
    variants: tuple[str, ...]
    measures: list[_Measure] = field(default_factory=list)
    reason: str = ""
    note: str = ""
    invalid: str = ""

    @property
    def p(self) -> float | None:
        """The claim's p-value: the largest of its measures' (an intersection-union test: the
        claim needs every measure), None without a test (missing data, one seed, invalid)."""
        if self.reason or self.invalid or not self.measures or any(m.test.p is None for m in self.measures):
            return None
        return max(m.test.p for m in self.measures)


def _gfid_claim(df: pd.DataFrame, claim: str, better: str, worse: str) -> _PendingClaim:
    """Claim "``better`` has a lower gFID than ``worse``", decided on KID with FID beside it
    (on FID, and said so, where the study has no KID: an older study, or eval.kid off)."""
    pending = _PendingClaim(claim, (better, worse))
    kid = _column_measure(df, "KID", "kid", better, worse, -1, "{:.4g}")
    fid = _column_measure(df, "FID", "fid", better, worse, -1, "{:.2f}")
    if isinstance(kid, _Measure):
        pending.measures = [kid]
        if isinstance(fid, _Measure):
            pending.note = "beside it, " + _measure_text(fid, _measure_record(fid, None), None, 0)
    elif isinstance(fid, _Measure):
        pending.measures = [fid]
        pending.note = (f"on FID: no KID ({kid}); FID is biased at small sample counts, "
                        "by an amount that depends on the model")
    else:
        pending.reason = f"{kid}; {fid}"
    return pending


def _noise_variant_rows(
    noise_df: pd.DataFrame, variant: str, posterior_prefix: str
) -> tuple[str, pd.DataFrame] | str:
    """Rows of the noise table for ``variant``; if that variant is absent, the rows of the single
    variant whose ``posterior`` label starts with ``posterior_prefix``."""
    rows = noise_df[noise_df["variant"] == variant]
    if not rows.empty:
        return variant, rows
    if "posterior" in noise_df.columns:
        labels = noise_df["posterior"].astype(str).str.strip().str.lower()
        candidates = noise_df.loc[labels.str.startswith(posterior_prefix), "variant"].unique()
        if len(candidates) == 1:
            name = str(candidates[0])
            return name, noise_df[noise_df["variant"] == name]
        if len(candidates) > 1:
            return (
                f"variant {variant} not in the noise-robustness table and several variants have a "
                f"{posterior_prefix!r} posterior ({sorted(map(str, candidates))}); "
                f"name the one to compare {variant!r}"
            )
    return f"variant {variant} not in the noise-robustness table"


def _psnr_drops(rows: pd.DataFrame, low: float, high: float) -> pd.Series:
    """PSNR drop from noise ``low`` to ``high``, indexed by seed (seeds with both levels)."""
    seeds = rows["seed"] if "seed" in rows.columns else pd.Series(0, index=rows.index)
    drops = {}
    for seed, r in rows.groupby(seeds, sort=True):
        at = r.groupby("noise_std")["psnr"].mean()
        if low in at.index and high in at.index and _finite(at[low]) and _finite(at[high]):
            drops[int(seed)] = float(at[low] - at[high])
    return pd.Series(drops, dtype=float)


def _claim_noise(
    noise_df: pd.DataFrame | None, fixed_variant: str, learnable_variant: str
) -> _PendingClaim:
    claim = (
        "A fixed-σ̄ VAE keeps its reconstruction under latent noise better than a VAE with a "
        "learnable posterior variance (smaller PSNR drop at the largest noise level)."
    )
    pending = _PendingClaim(claim, (fixed_variant, learnable_variant))
    if noise_df is None:
        pending.reason = "noise-robustness data not provided"
        return pending
    _require_columns(noise_df, ["variant", "noise_std", "psnr"], "the noise-robustness table")
    found = []
    for variant, prefix in ((fixed_variant, "fixed"), (learnable_variant, "learnable")):
        res = _noise_variant_rows(noise_df, variant, prefix)
        if isinstance(res, str):
            pending.reason = res
            return pending
        found.append(res)
    (fixed_name, fixed_rows), (learn_name, learn_rows) = found
    pending.variants = (fixed_name, learn_name)
    fixed_rows = fixed_rows[np.isfinite(pd.to_numeric(fixed_rows["psnr"], errors="coerce"))]
    learn_rows = learn_rows[np.isfinite(pd.to_numeric(learn_rows["psnr"], errors="coerce"))]
    common = sorted(set(fixed_rows["noise_std"]) & set(learn_rows["noise_std"]))
    if len(common) < 2:
        pending.reason = (f"{fixed_name} and {learn_name} share fewer than two noise levels "
                          "with a finite PSNR")
        return pending
    low, high = float(common[0]), float(common[-1])
    drops = [_psnr_drops(fixed_rows, low, high), _psnr_drops(learn_rows, low, high)]
    for name, d in zip((fixed_name, learn_name), drops):
        if d.empty:
            pending.reason = f"no seed of {name} has PSNR at both noise std {low:g} and {high:g}"
            return pending
    m = _measure(f"PSNR drop (dB) from noise std {low:g} to {high:g}", fixed_name, learn_name,
                 drops[0], drops[1], -1, "{:.2f}")
    if isinstance(m, str):
        pending.reason = m
        return pending
    pending.measures = [m]
    pending.note = _relative_noise_note(fixed_name, fixed_rows, learn_name, learn_rows).lstrip(". ")
    return pending


def _relative_noise_note(fixed_name: str, fixed_rows: pd.DataFrame, learn_name: str,
                         learn_rows: pd.DataFrame) -> str:
    """The same comparison in each VAE's own latent units (noise std / std of its latent means),
    at the largest relative noise both were measured at (linear interpolation over the seeds'
    mean curve); empty without a ``noise_rel`` column."""
    if "noise_rel" not in fixed_rows.columns or "noise_rel" not in learn_rows.columns:
        return ""
    curves = []
    for rows in (fixed_rows, learn_rows):
        rows = rows.assign(noise_rel=pd.to_numeric(rows["noise_rel"], errors="coerce")).dropna(subset=["noise_rel"])
        mean = rows.groupby("noise_std")[["noise_rel", "psnr"]].mean().sort_values("noise_rel")
        if len(mean) < 2:
            return ""
        curves.append(mean)
    rel = min(c["noise_rel"].max() for c in curves)
    drops = [float(c["psnr"].iloc[0] - np.interp(rel, c["noise_rel"], c["psnr"])) for c in curves]
    return (f". In each VAE's own latent units, at noise {rel:.2g}× the std of its latent means: "
            f"{fixed_name} loses {drops[0]:.2f} dB, {learn_name} {drops[1]:.2f} dB")


def _claim_smoothness(df: pd.DataFrame, e2e: str, frozen: str) -> _PendingClaim:
    claim = (
        f"End-to-end latents ({e2e}) are smoother than frozen-VAE latents ({frozen}): "
        "lower total variation and higher autocorrelation."
    )
    pending = _PendingClaim(claim, (e2e, frozen))
    measures = [_column_measure(df, stat.name.replace("_", " "), stat.name, e2e, frozen, stat.sign, "{:.3f}")
                for stat in (BY_NAME["total_variation"], BY_NAME["autocorrelation"])]
    reasons = [m for m in measures if isinstance(m, str)]
    if reasons:
        pending.reason = "; ".join(reasons)
    else:
        pending.measures = measures  # type: ignore[assignment]
        pending.note = "the claim needs both measures: its p-value is the larger of the two"
    return pending


def _decide(pending: _PendingClaim, p_holm: float | None, alpha: float) -> tuple[str, str]:
    """(verdict, why) of a claim after the Holm correction."""
    if pending.invalid:
        return "invalid", ""
    if pending.reason:
        return "inconclusive", ""
    if any(m.test.n == 1 for m in pending.measures):
        return ONE_SEED, ""
    signs = {int(np.sign(m.test.mean_diff)) * m.sign for m in pending.measures}
    if len(signs) > 1:
        return "inconclusive", "the measures disagree in direction"
    if p_holm is None or p_holm >= alpha:
        return "inconclusive", f"the Holm-corrected interval includes zero (p_holm = {p_holm:.3g})"
    return ("reproduced", "") if signs == {1} else ("refuted", "the difference has the opposite sign")


def evaluate_claims(
    df: pd.DataFrame,
    noise_df: pd.DataFrame | None = None,
    *,
    simflow: str = "simflow",
    frozen_vae: str = "frozen_vae",
    e2e_learnable: str = "e2e_learnable",
    simflow_repa: str = "simflow_repa",
    simflow_equal_updates: str | None = "simflow_equal_updates",
    simflow_compute_matched: str | None = "simflow_compute_matched",
    alpha: float = ALPHA,
) -> list[dict[str, Any]]:
    """Check the paper's qualitative claims against the study's per-seed numbers.

    Each claim is a paired test over seeds (:mod:`simflow.analysis.stats`): per seed, the
    difference between the two variants' values; its mean, 95 % t-interval and two-sided p-value;
    the p-values of all claims that have a test adjusted by Holm's procedure. Verdicts
    (:data:`VERDICTS`): **reproduced** / **refuted** when the Holm-adjusted p is below ``alpha``
    (the Holm-corrected interval excludes zero) on the claimed / the opposite side, else
    **inconclusive**; :data:`ONE_SEED` with one paired seed; **inconclusive** when a variant or a
    value is missing; **invalid** when a compared variant's encoder collapsed (the ``collapsed``
    column), whatever its numbers say. Seeds present for one variant only are dropped and named.

    Claims, in order:

    1. SimFlow (``simflow``, fixed σ̄ = 0.5) has a lower gFID than the frozen-VAE variant.
    2. End-to-end fixed variance (``simflow``) beats end-to-end learnable variance on gFID.
    3. The fixed-σ̄ VAE loses less reconstruction PSNR under latent noise than the learnable one,
       comparing the drop from the smallest to the largest noise level both were measured at
       (needs ``noise_df``; the variants are looked up by name, falling back to the single
       variant whose ``posterior`` label starts with "fixed" / "learnable").
    4. End-to-end latents (``simflow``) are smoother than frozen-VAE latents: lower total
       variation and higher autocorrelation (both tested; the claim's p is the larger one, and
       measures that disagree in direction make it inconclusive).
    5. Adding REPA (``simflow_repa``) improves gFID over ``simflow``.
    6. Only when the study has ``simflow_equal_updates``: claim 1 at equal total updates.
    7. Only when the study has ``simflow_compute_matched``: claim 1 at equal training FLOPs, VAE
       pre-training included (:mod:`simflow.flops`).

    gFID claims are decided on the ``kid`` column (KID, unbiased at small sample counts) with FID
    beside it; on ``fid``, and said so in the evidence, when the table has no KID.

    Args:
        df: the per-(variant, seed) summary table (columns ``variant``, ``seed`` (optional: one
            seed), ``kid``, ``fid``, latent statistics, ``collapsed``...).
        noise_df: the noise-robustness table, or None if that stage was not run.
        simflow, frozen_vae, e2e_learnable, simflow_repa, simflow_equal_updates,
            simflow_compute_matched: the variant names.
        alpha: the family-wise error rate.

    Returns:
        One dict per claim: ``id, claim, verdict, reproduced`` (True / False / None, from the
        verdict), ``evidence``, ``variants``, the deciding measure's ``metric, difference,
        predicted, n, seeds, dropped_seeds, mean_a, mean_b, mean_diff, std_diff, ci_low, ci_high,
        p, ci_holm_low, ci_holm_high``, then ``p_holm``, ``holm_confidence`` and ``holm_family``
        (the number of claims corrected over), ``measures`` (each measure's numbers) and
        ``invalid`` (the reason) where it applies. Numbers that do not exist are None.
    """
    _require_columns(df, ["variant"], "the summary table")
    pending: dict[str, _PendingClaim] = {
        "gfid_vs_frozen_vae": _gfid_claim(
            df, f"SimFlow ({simflow}, fixed σ̄ = 0.5, end-to-end) has a lower gFID than the "
            f"frozen-VAE variant ({frozen_vae}).", simflow, frozen_vae),
        "fixed_vs_learnable_gfid": _gfid_claim(
            df, f"End-to-end training with a fixed variance ({simflow}) beats end-to-end training "
            f"with a learnable variance ({e2e_learnable}) on gFID.", simflow, e2e_learnable),
        "noise_robustness": _claim_noise(noise_df, simflow, e2e_learnable),
        "smoothness": _claim_smoothness(df, simflow, frozen_vae),
        "repa_gfid": _gfid_claim(
            df, f"Adding REPA alignment ({simflow_repa}) improves gFID over SimFlow ({simflow}).",
            simflow_repa, simflow),
    }
    if simflow_equal_updates and (df["variant"] == simflow_equal_updates).any():
        pending["gfid_vs_frozen_vae_equal_updates"] = _gfid_claim(
            df, f"At equal total updates ({simflow_equal_updates}: end-to-end for the frozen "
            f"pipeline's VAE pre-training + flow steps), SimFlow has a lower gFID than {frozen_vae}.",
            simflow_equal_updates, frozen_vae)
    if simflow_compute_matched and (df["variant"] == simflow_compute_matched).any():
        pending["gfid_vs_frozen_vae_compute_matched"] = _gfid_claim(
            df, f"At equal training compute ({simflow_compute_matched}: end-to-end for the frozen "
            f"pipeline's counted FLOPs, VAE pre-training included), SimFlow has a lower gFID than "
            f"{frozen_vae}.", simflow_compute_matched, frozen_vae)
    compared = {"noise_robustness": (simflow, e2e_learnable)}  # by name, whatever the fallback found
    for claim_id, c in pending.items():
        reasons = [f"{v} has a collapsed encoder ({k})" for v in compared.get(claim_id, c.variants)
                   if (k := collapsed_seeds(df, v))]
        if reasons:
            c.invalid = ("; ".join(reasons) + ": a comparison with a degenerate model says nothing "
                         "about the method")

    family = [cid for cid, c in pending.items() if c.p is not None]
    p_holm = dict(zip(family, holm([pending[cid].p for cid in family])))
    confidence = dict(zip(family, holm_confidence([pending[cid].p for cid in family], alpha)))
    out = []
    for claim_id, c in pending.items():
        verdict, why = _decide(c, p_holm.get(claim_id), alpha)
        conf = confidence.get(claim_id)
        records = [_measure_record(m, conf) for m in c.measures]
        texts = [_measure_text(m, r, conf, len(family)) for m, r in zip(c.measures, records)]
        evidence = "; ".join(texts) if texts else c.reason
        if c.reason and texts:
            evidence += f"; {c.reason}"
        for extra in (c.note, why):
            if extra:
                evidence += f". {extra[0].upper()}{extra[1:]}"
        # The deciding measure (the largest p) carries the claim's top-level numbers.
        top = max(records, key=lambda r: -1.0 if r["p"] is None else r["p"]) if records else {}
        entry: dict[str, Any] = {
            "id": claim_id, "claim": c.claim, "verdict": verdict,
            "reproduced": {"reproduced": True, "refuted": False}.get(verdict),
            "evidence": evidence, "variants": list(c.variants),
            **{k: top.get(k) for k in ("metric", "difference", "predicted", "n", "seeds", "dropped_seeds",
                                       "mean_a", "mean_b", "mean_diff", "std_diff", "ci_low", "ci_high",
                                       "p", "ci_holm_low", "ci_holm_high")},
            "p_holm": p_holm.get(claim_id), "holm_confidence": conf,
            "holm_family": len(family) if claim_id in p_holm else None,
            "measures": records,
        }
        if c.invalid:
            entry["invalid"] = c.invalid
        out.append(entry)
    return out
