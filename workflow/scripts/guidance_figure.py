"""Snakemake script of rule guidance_figure: one unit's CFG sweep (samples per weight, gFID)."""

import contextlib
import json
from pathlib import Path

import numpy as np

from simflow.analysis import figures


def main(sm) -> None:
    with open(sm.input.metrics) as fh:
        sweep = json.load(fh)["sweep"]
    with np.load(sm.input.samples) as npz:
        images, weights = npz["images"], npz["weights"].tolist()
    fids = [row["fid"] for row in sweep]
    if [row["guidance"] for row in sweep] != weights:
        raise ValueError(f"{sm.input.metrics} and {sm.input.samples} list different CFG weights")
    fig = figures.fig_guidance_sweep(weights, fids, images,
                                     title=f"{sm.wildcards.variant} s{sm.wildcards.seed}")
    figures.save_figure(fig, Path(sm.output[0]).with_suffix(""))
    print(f"wrote {sm.output[0]}")


sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    main(sm)
