"""The sampler (simflow.sampling): it inverts the flow, its cached loop equals the plain reference, and
guidance does what its formulas say. The fast paths are in test_sampling_fast_paths.py."""

import math

import pytest
import torch

from helpers_flow import CONFIGS, labels_for, make, randomise
from simflow.flow import StepParams, TransformerFlow, patchify, unpatchify
from simflow.sampling import KVCache, LinearGuidance, PrecisionGuidance, sample
from simflow.sampling.decode import CPUDecodeStep


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reverse_inverts_forward(name):
    model = make(name)
    x = torch.randn(4, model.in_channels, model.img_size, model.img_size)
    y = labels_for(model, 4)
    z, logdet = model(x, y)
    assert z.shape == x.shape and logdet.shape == (4,)
    assert (z - x).abs().max() > 1e-2, "randomised blocks must not be the identity"
    assert torch.allclose(sample(model, z, y), x, atol=1e-4)


@pytest.mark.parametrize("name", ["multi_block", "patch2", "conditional_adaln"])
def test_cached_reverse_equals_uncached(name):
    model = make(name)
    z = torch.randn(3, model.in_channels, model.img_size, model.img_size)
    y = labels_for(model, 3)
    cached = sample(model, z, y)
    uncached = sample(model, z, y, mode="uncached")
    assert torch.allclose(cached, uncached, atol=1e-5)
    guided_cached = sample(model, z, y, guidance=1.5, guidance_method="precision") if y is not None else None
    if guided_cached is not None:
        guided_uncached = sample(model, z, y, guidance=1.5, guidance_method="precision", mode="uncached")
        assert torch.allclose(guided_cached, guided_uncached, atol=1e-5)


@pytest.mark.parametrize("name", ["conditional_adaln", "conditional_add_exp"])
@pytest.mark.parametrize("options", [dict(), dict(guide="shift"), dict(guide="scale", annealed=True)],
                         ids=["both", "shift", "scale_annealed"])
def test_the_sample_stage_path_with_linear_guidance_equals_the_uncached_reference(name, options):
    """mode="auto" (cached on CPU: inference mode, narrowed cache writes, lerp guidance, fused
    affine update) against a full causal pass per token, to float error: 1e-4, the guided tolerance
    (guidance amplifies rounding by up to 1 + w; the "add"/exp model reaches |x| ≈ 20 here, and its
    deviation was 1.8e-5 before the speed work too)."""
    model = make(name)
    z = torch.randn(3, model.in_channels, model.img_size, model.img_size)
    y = labels_for(model, 3)
    fast = sample(model, z, y, guidance=1.5, mode="auto", **options)
    plain = sample(model, z, y, guidance=1.5, mode="uncached", **options)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    # an ordinary tensor, not an inference-mode one: the Tweedie step takes its gradient
    assert not fast.is_inference()
    fast.requires_grad_(True)


def test_kv_cache_layouts_attend_alike():
    """The CPU layout (keys transposed, two matmuls for one query) equals SDPA over the plain
    layout, for single positions and for a causal multi-position chunk (Jacobi)."""
    torch.manual_seed(0)
    caches = [KVCache(1, 2, 3, 12, 8, torch.device("cpu"), torch.float32, transposed_keys=t)
              for t in (True, False)]
    assert caches[0].keys[0].shape == (2, 3, 8, 12) and caches[1].keys[0].shape == (2, 3, 12, 8)
    for n in (1, 1, 4, 1, 3):
        q, k, v = (torch.randn(2, 3, n, 8) for _ in range(3))
        out_t, out_plain = (cache.attend(0, q, k, v) for cache in caches)
        torch.testing.assert_close(out_t, out_plain, atol=1e-6, rtol=1e-6)
        for cache in caches:
            cache.length += n


@pytest.mark.parametrize("name,gelu,temperature", [
    ("conditional_adaln", "none", None), ("conditional_add_exp", "none", None),
    ("multi_block", "tanh", 1.5), ("conditional_add_exp", "tanh", 2.0)])
def test_the_cpu_decode_step_equals_the_block_step(name, gelu, temperature):
    """CPUDecodeStep (the cached sampler's step on CPU) against FlowBlock.step, position by position
    over two caches, with both CFG branches (2B rows), attention temperature on the unconditional
    rows and either GELU: the same parameters and the same cached keys and values, to float error."""
    torch.manual_seed(0)
    model = randomise(TransformerFlow(head_dim=16, gelu=gelu, **CONFIGS[name]))
    b, rows = 3, 6
    y = labels_for(model, b)
    emb = None if y is None else torch.cat([model.class_embedding(y, b, torch.device("cpu")),
                                            model.class_embedding(None, b, torch.device("cpu"))])
    add_cond, ada_cond = model.conditions(emb)
    query_scale = None
    if temperature is not None:
        query_scale = torch.ones(rows, 1, 1, 1)
        query_scale[b:] = 1 / temperature
    with torch.inference_mode():
        for block in model.blocks:
            caches = [KVCache(len(block.layers), rows, 2, model.num_tokens, 16, torch.device("cpu"),
                              torch.float32) for _ in range(2)]
            mods = block.modulations(ada_cond)
            decode = CPUDecodeStep(block, caches[0], add_cond, query_scale, mods)
            for i in range(model.num_tokens):
                token_in = torch.randn(rows, 1, model.width)
                fast = decode(token_in, i)
                plain = block.step(token_in, slice(i, i + 1), caches[1], add_cond, ada_cond,
                                   query_scale, mods)
                for cache in caches:
                    cache.length += 1
                torch.testing.assert_close(fast.shift, plain.shift, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(fast.log_scale, plain.log_scale, atol=1e-5, rtol=1e-5)
            for layer in range(len(block.layers)):  # the same keys and values were cached
                torch.testing.assert_close(caches[0].keys[layer], caches[1].keys[layer])
                torch.testing.assert_close(caches[0].values[layer], caches[1].values[layer])


def test_the_cpu_decode_step_needs_the_cpu_cache_layout():
    model = make("multi_block")
    cache = KVCache(1, 2, 2, model.num_tokens, 16, torch.device("cpu"), torch.float32,
                    transposed_keys=False)
    with pytest.raises(ValueError, match="transposed keys"):
        CPUDecodeStep(model.blocks[0], cache, None, None, None)


def test_guidance_zero_equals_unguided():
    model = make("conditional_adaln")
    z = torch.randn(4, 4, 4, 4)
    y = labels_for(model, 4)
    plain = sample(model, z, y)
    for method in ("linear", "precision"):
        assert torch.allclose(sample(model, z, y, guidance=0.0, guidance_method=method), plain, atol=1e-5)
    assert not torch.allclose(sample(model, z, y, guidance=2.0), plain, atol=1e-3)


def test_batched_cfg_equals_two_separate_passes():
    """Reference: TarFlow's scheme, one cache per branch, two single-batch passes per token."""
    model = make("conditional_adaln")
    z = torch.randn(3, 4, 4, 4)
    y = labels_for(model, 3)
    weight, strategy = 1.7, LinearGuidance(annealed=True)
    batched = sample(model, z, y, guidance=weight, guidance_method=strategy)

    tokens = patchify(z, 1)
    emb_c = model.class_embedding(y, 3, z.device)
    emb_u = model.class_embedding(None, 3, z.device)
    with torch.no_grad():
        for block in reversed(model.blocks):
            z_ord = block.order(tokens)
            x_ord = torch.empty_like(z_ord)
            caches = [KVCache(len(block.layers), 3, 2, model.num_tokens, 16, z.device, torch.float32)
                      for _ in range(2)]
            inp = block.sos.expand(3, -1, -1)
            for i in range(model.num_tokens):
                pc = block.step(inp, slice(i, i + 1), caches[0], None, emb_c, None)
                pu = block.step(inp, slice(i, i + 1), caches[1], None, emb_u, None)
                for cache in caches:
                    cache.length += 1
                p = strategy(pc, pu, weight, i, model.num_tokens)
                x_ord[:, i:i + 1] = z_ord[:, i:i + 1] * torch.exp(p.log_scale) + p.shift
                inp = block.proj_in(x_ord[:, i:i + 1])
            tokens = block.order(x_ord)
    assert torch.allclose(batched, unpatchify(tokens, 4, 4, 4, 1), atol=1e-5)


def test_temperature_guidance_at_temperature_one_is_no_guidance():
    model = make("multi_block")  # unconditional
    z = torch.randn(2, 4, 8, 8)
    plain = sample(model, z)
    assert torch.allclose(sample(model, z, guidance=3.0, attn_temp=1.0), plain, atol=1e-5)
    assert not torch.allclose(sample(model, z, guidance=3.0, attn_temp=1.5), plain, atol=1e-3)


def test_temperature_guidance_of_a_conditional_model_contrasts_the_null_class():
    """TarFlow: the unconditional branch is the null class, under τ; at τ = 1 that is plain CFG."""
    model = next(make(n) for n in CONFIGS if CONFIGS[n].get("num_classes"))
    z, y = torch.randn(2, model.in_channels, model.img_size, model.img_size), torch.tensor([1, 2])
    cfg_only = sample(model, z, y, guidance=2.0)
    assert torch.allclose(sample(model, z, y, guidance=2.0, attn_temp=1.0), cfg_only, atol=1e-5)
    assert not torch.allclose(sample(model, z, y), cfg_only, atol=1e-3)


def test_unconditional_guidance_without_temperature_is_an_error():
    model = make("multi_block")
    with pytest.raises(ValueError, match="attn_temp"):
        sample(model, torch.randn(1, 4, 8, 8), guidance=1.0)


def test_guidance_strategies_on_known_values():
    cond = StepParams(torch.tensor([1.0]), torch.tensor([math.log(0.5)]))
    uncond = StepParams(torch.tensor([0.0]), torch.tensor([math.log(1.0)]))
    lin = LinearGuidance()(cond, uncond, 2.0, 0, 4)
    assert lin.shift.item() == pytest.approx(3.0)
    assert lin.log_scale.item() == pytest.approx(3 * math.log(0.5))
    annealed = LinearGuidance(guide="shift", annealed=True)(cond, uncond, 2.0, 1, 4)
    assert annealed.shift.item() == pytest.approx(1.0 + 2.0 * 2 / 4)
    assert annealed.log_scale.item() == pytest.approx(math.log(0.5))
    negative = LinearGuidance()(cond, uncond, -0.75, 0, 4)  # lerp's other branch (weight < ½)
    assert negative.shift.item() == pytest.approx(1.0 - 0.75 * 1.0)
    # precision form: s = (0.5/1)² = 0.25, denom = 1 + 2 − 0.5 = 2.5
    prec = PrecisionGuidance()(cond, uncond, 2.0, 0, 4)
    assert prec.shift.item() == pytest.approx(3.0 / 2.5)
    assert torch.exp(prec.log_scale).item() == pytest.approx(0.5 / math.sqrt(2.5))



def test_unknown_guidance_method_is_an_error():
    with pytest.raises(ValueError, match="unknown guidance"):
        sample(make("conditional_adaln"), torch.randn(1, 4, 4, 4), torch.tensor([0]), guidance=1.0,
               guidance_method="revised")
