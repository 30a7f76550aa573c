"""Analysis of a finished study: latent smoothness statistics, figures and the results report.

* :mod:`simflow.analysis.latent_stats`: the four latent-map statistics of the paper's Figure 4;
* :mod:`simflow.analysis.summary`: seed aggregation, the paper's published numbers, the claim
  checks and the Markdown report;
* :mod:`simflow.analysis.stats`: the paired t-test over seeds and Holm's correction that decide
  the claims;
* :mod:`simflow.analysis.tables`: the summary rule's tables (summary_per_seed.csv, summary.csv,
  claims.json, summary.md) from the stages' outputs;
* :mod:`simflow.analysis.figures`: matplotlib figures. Import it explicitly
  (``from simflow.analysis import figures``); it is not imported here, so that computing
  statistics during training does not load matplotlib.
* :mod:`simflow.analysis.load`: loading a finished study's results and the notebooks' tables
  (``from simflow.analysis import load``; ``load.open_results(results_dir, study)``);
* :mod:`simflow.analysis.report`: the summary page of ``snakemake --report`` and what the
  study's MLflow parent run holds.
"""

from simflow.analysis.latent_stats import (
    autocorrelation,
    high_frequency_ratio,
    latent_statistics,
    spectral_entropy,
    total_variation,
)
from simflow.analysis.summary import (
    DEFAULT_PAPER_MAPPING,
    PAPER_RESULTS,
    aggregate_seeds,
    evaluate_claims,
    results_markdown,
)

__all__ = [
    "autocorrelation",
    "high_frequency_ratio",
    "latent_statistics",
    "spectral_entropy",
    "total_variation",
    "DEFAULT_PAPER_MAPPING",
    "PAPER_RESULTS",
    "aggregate_seeds",
    "evaluate_claims",
    "results_markdown",
]
