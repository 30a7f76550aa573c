"""Sampling from a :class:`~simflow.flow.TransformerFlow`: noise → data, block by block, token by
token, with guidance and the fast paths.

* :mod:`~simflow.sampling.sampler`: :func:`sample`, the entry point, and its modes
  (:data:`SAMPLING_MODES`, :func:`resolve_mode`; ``auto`` is ``cached``, or on CUDA the fastest
  mode a GPU run has verified, :data:`GPU_VERIFIED_MODES`).
* :mod:`~simflow.sampling.inverse`: one block's inverse: the KV-cached token loop, block-wise
  Jacobi and the uncached reference.
* :mod:`~simflow.sampling.static`: the static-shape step, its ``torch.compile`` d form and
  per-block CUDA-graph replay.
* :mod:`~simflow.sampling.cache`: the preallocated key/value caches.
* :mod:`~simflow.sampling.guidance`: guidance strategies (TarFlow's linear CFG, STARFlow's
  precision form) and their registry.

The ``sample`` stage, the training loop's sample grids and gFID probe and ``simflow bench`` all
sample through :func:`sample` (the stage's mode is ``sample.mode``).
"""

from simflow.sampling.cache import KVCache, StaticKVCache
from simflow.sampling.guidance import (GUIDANCE_STRATEGIES, GuidanceStrategy, LinearGuidance,
                                       PrecisionGuidance, annealed_weight, build_guidance)
from simflow.sampling.sampler import (CUDA_ONLY_MODES, GPU_VERIFIED_MODES, SAMPLING_MODES,
                                      resolve_mode, sample)

__all__ = ["CUDA_ONLY_MODES", "GPU_VERIFIED_MODES", "GUIDANCE_STRATEGIES", "GuidanceStrategy", "KVCache", "LinearGuidance",
           "PrecisionGuidance", "SAMPLING_MODES", "StaticKVCache", "annealed_weight",
           "build_guidance", "resolve_mode", "sample"]
