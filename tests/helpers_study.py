"""The summary rule's tables for the tests' fake finished studies: the same function the rule's
script calls (simflow.analysis.tables.write_study_tables)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from simflow.analysis.tables import write_study_tables


def write_summary_tables(study_dir: Path, rows: list[dict], latent_rows: list[dict], noise_rows: list[dict], *,
                         heading: str = "", per_seed_table: bool = True, noise_csv: bool = True,
                         floor: dict | None = None) -> None:
    """summary.csv, latent_stats.csv, claims.json and summary.md from per-(variant, seed) ``rows``;
    summary_per_seed.csv and noise_robustness.csv unless switched off (an older study's layout)."""
    write_study_tables(study_dir, pd.DataFrame(rows), latent_rows, pd.DataFrame(noise_rows), heading=heading,
                       floor=floor)
    if not per_seed_table:
        (study_dir / "summary_per_seed.csv").unlink()
    if not noise_csv:
        (study_dir / "noise_robustness.csv").unlink()
