"""Properties of the transformer autoregressive flow (simflow/flow.py): the model; its sampler is tested
in test_sampling.py and test_sampling_fast_paths.py."""

import math

import pytest
import torch

from helpers_flow import labels_for, make
from simflow.flow import TransformerFlow, bits_per_dim, patchify, unpatchify


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(unpatchify(tokens, 3, 8, 8, 2), x)


def test_fresh_flow_is_identity_with_zero_logdet():
    model = TransformerFlow(4, 4, 1, 32, [1, 1], head_dim=16)
    x = torch.randn(3, 4, 4, 4)
    z, logdet = model(x)
    assert torch.allclose(z, x, atol=1e-6)
    assert torch.allclose(logdet, torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("name", ["patch2", "conditional_add_exp"])
def test_logdet_matches_autograd_jacobian(name):
    model = make(name).double()
    x = torch.randn(1, model.in_channels, model.img_size, model.img_size, dtype=torch.float64)
    y = labels_for(model, 1)
    jac = torch.autograd.functional.jacobian(lambda v: model(v, y)[0], x)
    jac = jac.reshape(x.numel(), x.numel())
    _, expected = torch.linalg.slogdet(jac)
    _, logdet = model(x, y)
    assert logdet.item() == pytest.approx(expected.item(), abs=1e-8)


@pytest.mark.parametrize("flip", [False, True])
def test_block_parameters_depend_only_on_earlier_tokens(flip):
    model = make("multi_block").double()
    block = model.blocks[1 if flip else 0]
    assert block.flip == flip
    t, d = model.num_tokens, model.token_dim
    x = torch.randn(1, t, d, dtype=torch.float64)

    def params_in_block_order(tokens):
        h, _ = block.run_layers(block.inputs(block.order(tokens), None), None)
        p = block.params(h)
        return torch.cat([p.shift, p.log_scale], dim=-1)  # (1, T, 2D) in the block's order

    jac = torch.autograd.functional.jacobian(params_in_block_order, x)[0, :, :, 0]  # (T, 2D, T, D)
    dependence = jac.abs().sum(dim=(1, 3))  # (output position i in block order, input raster token)
    order = torch.arange(t).flip(0) if flip else torch.arange(t)
    dependence = dependence[:, order]  # columns in block order too
    assert torch.all(dependence.triu() == 0), "parameters of token i depend on a token ≥ i"
    assert torch.all(dependence.tril(-1)[1:, :].sum(1) > 0), "token i > 0 must see earlier tokens"


def test_causal_attention_ignores_future_inputs_in_training_pass():
    model = make("deep_shallow")
    x = torch.randn(2, 4, 4, 4)
    tokens = patchify(x, 1)
    block = model.blocks[0]
    h1, _ = block.run_layers(block.inputs(tokens, None), None)
    changed = tokens.clone()
    changed[:, 7:] += 5.0  # position i's transformer input is token i − 1, so outputs ≤ 7 are unaffected
    h2, _ = block.run_layers(block.inputs(changed, None), None)
    assert torch.allclose(h1[:, :8], h2[:, :8], atol=1e-6)
    assert not torch.allclose(h1[:, 8:], h2[:, 8:], atol=1e-3)


def test_dropped_label_uses_mean_class_embedding():
    model = make("conditional_adaln")
    emb = model.class_embedding(torch.tensor([2, -1]), 2, torch.device("cpu"))
    assert torch.allclose(emb[0], model.class_embed.weight[2])
    assert torch.allclose(emb[1], model.class_embed.weight.mean(0))
    assert torch.allclose(model.class_embedding(None, 1, torch.device("cpu"))[0], model.class_embed.weight.mean(0))


def test_label_dropout_only_in_training():
    model = make("conditional_adaln")
    model.label_drop = 1.0
    x = torch.randn(2, 4, 4, 4)
    y = torch.tensor([0, 1])
    z_uncond, _ = model(x, None)
    model.train()
    z_train, _ = model(x, y)
    assert torch.allclose(z_train, z_uncond, atol=1e-6)
    model.eval()
    assert not torch.allclose(model(x, y)[0], z_uncond, atol=1e-4)


def test_nll_is_per_sample_nats_and_bits_per_dim():
    model = TransformerFlow(2, 4, 1, 32, [1], head_dim=16)  # identity at init → standard normal density
    x = torch.randn(3, 2, 4, 4)
    expected = -torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(model.nll(x), expected, atol=1e-4)
    bpd = bits_per_dim(model.nll(x), model.num_dims)
    assert torch.allclose(bpd, expected / 32 / math.log(2), atol=1e-5)


def test_hidden_layer_is_returned_in_raster_order():
    model = make("multi_block")
    x = torch.randn(2, 4, 8, 8)
    out = model.to_noise(x, hidden_layer=1)  # layer 1 is the first (only) layer of the flipped block 1
    assert out.hidden.shape == (2, 64, 32)
    block = model.blocks[1]
    tokens0, _, _ = model.blocks[0](patchify(x, 1))
    h, _ = block.run_layers(block.inputs(block.order(tokens0), None), None)
    assert torch.allclose(out.hidden, h.flip(1), atol=1e-6)
    assert len(out.block_sq_norms) == 3


def test_tweedie_denoising_on_a_gaussian_with_known_score():
    """A flow that is exactly N(0, s²): its score is −x/s², so x + σ²·score = x·(1 − σ²/s²)."""
    model = TransformerFlow(1, 2, 1, 16, [1], head_dim=16, scale_param="exp", soft_clip=0.0).eval()
    s = 2.0
    with torch.no_grad():
        model.blocks[0].proj_out.bias[1] = math.log(s)  # log σ of every token = log s
    x = torch.randn(5, 1, 2, 2)
    sigma = 0.3
    expected = x * (1 - sigma ** 2 / s ** 2)
    assert torch.allclose(model.denoise(x, sigma), expected, atol=1e-5)
    assert torch.allclose(model.denoise(x, sigma, step_scale=0.5), x * (1 - 0.5 * sigma ** 2 / s ** 2), atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        TransformerFlow(4, 6, 4, 32, [1], head_dim=16)
    with pytest.raises(ValueError, match="scale_param"):
        TransformerFlow(4, 4, 1, 32, [1], head_dim=16, scale_param="tanh")
