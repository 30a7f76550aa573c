"""The GPU paths against their plain counterparts, on a CUDA device (skipped without one; run by
scripts/gpu_check.sh, whose report docs/gpu_report.md is what ``sample.mode: auto`` may switch on,
simflow.sampling.GPU_VERIFIED_MODES). The CUDA-graph sampler's test is
tests/test_sampling_fast_paths.py::test_cuda_graph_step_equals_eager_on_gpu.

Tolerances: fp32 fast paths 1e-4 (guided: the guidance amplifies rounding by up to 1 + w); the
bf16 training step against fp32: the loss within 2% and every gradient within a cosine of 0.99
(bf16 keeps 8 bits of mantissa; the affine parameters stay fp32)."""

import pytest
import torch

from simflow.flow import TransformerFlow
from simflow.sampling import LinearGuidance, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CONFIG = dict(in_channels=4, img_size=8, patch_size=1, channels=64, layers_per_block=[2, 2],
              num_classes=5, head_dim=32)


def make() -> TransformerFlow:
    torch.manual_seed(0)
    model = TransformerFlow(**CONFIG)
    for name, param in model.named_parameters():  # no identity blocks
        if (name.endswith("weight") and param.dim() > 1) or name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.1)
    return model.cuda().eval()


def inputs(model: TransformerFlow, batch: int = 4):
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(batch, model.in_channels, model.img_size, model.img_size, generator=gen)
    return z.cuda(), (torch.arange(batch) % model.num_classes).cuda()


GUIDE = dict(guidance=1.5, guidance_method=LinearGuidance(annealed=True))


def test_bf16_training_step_matches_fp32_on_gpu():
    model = make().train()
    x, y = inputs(model, 16)

    def loss_and_grads(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model.nll(x, y).mean() / model.num_dims
        loss.backward()
        return float(loss), {n: p.grad.detach().float().flatten().clone()
                             for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)  # the same label dropout in both
    loss32, grads32 = loss_and_grads(False)
    torch.manual_seed(1)
    loss16, grads16 = loss_and_grads(True)
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert grads16.keys() == grads32.keys()
    for name, g in grads32.items():
        if g.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(g, grads16[name], dim=0)
            assert cos > 0.99, f"{name}: cosine {float(cos):.4f} between bf16 and fp32 gradients"


def test_compiled_training_forward_equals_eager_on_gpu():
    eager = make()
    compiled = make().compile_blocks()
    x, y = inputs(eager)
    with torch.no_grad():
        z_e, ld_e = eager(x, y)
        z_c, ld_c = compiled(x, y)
    torch.testing.assert_close(z_c, z_e, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ld_c, ld_e, atol=1e-3, rtol=1e-5)


def test_compiled_sampling_equals_cached_on_gpu():
    model = make()
    z, y = inputs(model)
    torch.testing.assert_close(sample(model, z, y, mode="compiled"), sample(model, z, y), atol=1e-4, rtol=0)
    torch.testing.assert_close(sample(model, z, y, mode="compiled", **GUIDE), sample(model, z, y, **GUIDE),
                               atol=1e-4, rtol=0)


def test_jacobi_with_zero_tolerance_equals_cached_on_gpu():
    model = make()
    z, y = inputs(model)
    for guide in ({}, GUIDE):
        torch.testing.assert_close(sample(model, z, y, mode="jacobi", jacobi_block_size=16, jacobi_tol=0.0, **guide),
                                   sample(model, z, y, **guide), atol=1e-4, rtol=0)


def test_cuda_graph_sampling_under_bf16_autocast_equals_cached_on_gpu():
    """The stages sample under train.precision's autocast (bf16 on CUDA by default): the captured
    graph must run the same bf16 arithmetic as the eager cached loop."""
    model = make()
    z, y = inputs(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = sample(model, z, y, mode="cuda_graph", **GUIDE)
        cached = sample(model, z, y, **GUIDE)
    assert torch.isfinite(graphed).all()
    torch.testing.assert_close(graphed.float(), cached.float(), atol=5e-2, rtol=5e-2)
