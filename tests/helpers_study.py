"""The summary rule's tables for the tests' fake finished studies (workflow/scripts/summary.py
writes the real ones): one row per variant with the seed mean under the metric's own name."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from simflow.analysis import aggregate_seeds, evaluate_claims, results_markdown


def write_summary_tables(study_dir: Path, rows: list[dict], latent_rows: list[dict], noise_rows: list[dict], *,
                         heading: str = "", per_seed_table: bool = True, noise_csv: bool = True) -> None:
    """summary.csv, latent_stats.csv, claims.json and summary.md from per-(variant, seed) ``rows``;
    summary_per_seed.csv and noise_robustness.csv unless switched off (an older study's layout)."""
    per_seed = pd.DataFrame(rows)
    if per_seed_table:
        per_seed.to_csv(study_dir / "summary_per_seed.csv", index=False)
    agg = aggregate_seeds(per_seed.drop(columns="seed"))
    agg = agg.rename(columns={c: c[: -len("_mean")] for c in agg.columns if c.endswith("_mean")})
    agg.to_csv(study_dir / "summary.csv", index=False)
    pd.DataFrame(latent_rows).to_csv(study_dir / "latent_stats.csv", index=False)
    noise = pd.DataFrame(noise_rows)
    if noise_csv:
        noise.to_csv(study_dir / "noise_robustness.csv", index=False)
    claims = evaluate_claims(per_seed, noise)
    (study_dir / "claims.json").write_text(json.dumps(claims))
    (study_dir / "summary.md").write_text(heading + results_markdown(per_seed, claims))
