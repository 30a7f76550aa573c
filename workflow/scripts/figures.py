"""Snakemake script of rule figures: the paper's Figures 2, 3a, 3b, 4, 5, the rate-weight sweep
and a sample grid."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from simflow.analysis import figures
from simflow.contracts import RATE_SWEEP


def not_applicable(text: str) -> Figure:
    """A small figure saying why a panel is empty (e.g. a study of pixel-space variants only)."""
    fig = Figure(figsize=(4.0, 1.0))
    fig.text(0.5, 0.5, text, ha="center", va="center", color="0.4")
    return fig


def main(sm) -> None:
    per_seed = pd.read_csv(sm.input.per_seed)
    noise = pd.read_csv(sm.input.noise)
    several_seeds = len({s for _, s in sm.params.units}) > 1
    interpolations, samples = {}, {}
    for i, (variant, seed) in enumerate(sm.params.units):
        label = f"{variant} s{seed}" if several_seeds else variant
        with np.load(sm.input.interpolation[i]) as npz:
            # pixel variants have no latent path: an empty arr_0
            if "arr_0" in npz.files and npz["arr_0"].size:
                interpolations[label] = npz["arr_0"]
        with np.load(sm.input.samples[i]) as npz:
            samples[label] = npz["arr_0"][: sm.params.grid_images]

    def save(fig: Figure, key: str) -> None:
        stem = Path(sm.output[key]).with_suffix("")
        figures.save_figure(fig, stem)
        print(f"wrote {stem}.png/.pdf")

    curves = pd.read_csv(sm.input.fid_curves)
    save(figures.fig_gfid_training(curves) if len(curves)
         else not_applicable("no gFID probes during training (train.fid_every: 0)"), "fig2")
    has_sweep = (per_seed["group"].astype(str) == RATE_SWEEP).any()
    save(figures.fig_rate_sweep(per_seed, reference=sm.params.sweep_reference) if has_sweep
         else not_applicable(f"no {RATE_SWEEP} variants in this study"), "rate_sweep")
    save(figures.fig_noise_robustness(noise) if len(noise)
         else not_applicable("no VAE latents in this study: no noise sweep"), "fig3a")
    save(figures.fig_interpolations(interpolations) if interpolations
         else not_applicable("no VAE latents in this study: no interpolations"), "fig3b")
    save(figures.fig_latent_stats(per_seed), "fig4")
    floor = json.loads(Path(sm.input.floor).read_text())
    save(figures.fig_fid(per_seed, sweep_reference=sm.params.sweep_reference, floor=floor), "fig5")
    save(figures.fig_sample_grids(samples, nrow=int(np.ceil(np.sqrt(sm.params.grid_images)))), "grid")


sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    main(sm)
