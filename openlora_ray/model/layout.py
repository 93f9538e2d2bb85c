"""Which base-weight layout the projections use, chosen on the machine at hand.

``F.linear(x, W)`` reads ``W (out, in)`` as stored; ``x @ W^T`` needs the transposed copy made
once at load. On CUDA the first is what cuBLAS wants. On CPU it depends on the CPU and its BLAS
kernels: the transposed layout ran decode-sized batches 1.6x faster on one Intel Xeon and lost on
an AMD EPYC (base decode 0.78x of transformers' there). So on CPU both are timed once at load on
the model's own largest fused shape at a decode-sized batch, and the faster one is kept.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from openlora_ray.bench.timing import time_interleaved

log = logging.getLogger(__name__)

ROWS = 16  # a decode-sized batch
REPEATS = 7


@functools.cache
def choose_transposed(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """True to store fused weights as ``(in, out)`` and multiply ``x @ W``; False for ``F.linear``.

    Timed once per process and shape: engines built one after another in one process (a
    benchmark's configurations) must not differ by the noise of a few timings on a busy machine."""
    if device.type != "cpu":
        return False
    weight = torch.randn(out_features, in_features, dtype=dtype)
    weight_t = weight.T.contiguous()
    x = torch.randn(ROWS, 1, in_features, dtype=dtype)
    variants = {"linear": lambda: F.linear(x, weight), "transposed": lambda: x @ weight_t}
    with torch.inference_mode():  # interleaved, so that a noisy neighbour slows both alike
        best = time_interleaved(variants, iters=1, repeats=REPEATS, warmup=0)
    transposed = best["transposed"] < best["linear"]
    log.info(
        "weight layout: %s (median x @ W^T %.3f ms, F.linear %.3f ms, %d rows x %d -> %d)",
        "transposed" if transposed else "as stored", best["transposed"] * 1e3, best["linear"] * 1e3, ROWS, in_features, out_features,
    )
    return transposed
