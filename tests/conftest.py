"""Test-wide settings.

One intra-op thread per process: many tests start subprocesses (torchrun ranks, submitit jobs,
Snakemake jobs) on a 2-core machine, where oversubscribed BLAS/OpenMP threads made tests an order
of magnitude slower. Subprocesses inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
