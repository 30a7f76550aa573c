"""The training step as the train stage (and `simflow bench`) runs it: `train.compile`, and the EMA
weights swapped in place for the sample grids and gFID probes."""

import pytest
import torch

from simflow.config import load_config
from simflow.distributed import DistEnv
from simflow.flow import TransformerFlow
from simflow.model import build_model
from simflow.train import accumulate_gradients, ema_weights, train

TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16"]


def tiny(*overrides):
    cfg = load_config(overrides=TINY + list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg, 1, 10).train()


def batch(n=8):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(n) % 10


# --------------------------------------------------------------------------------------------
# train.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_training_step_equals_the_eager_one():
    """The step with compiled flow blocks (what train.compile runs) gives the eager loss to a relative 1e-5
    and every gradient to 1e-4 relative / 1e-6 absolute: Inductor only regroups the same fp32 arithmetic.
    The compilation takes ~30 s on a 2-core CPU, hence `slow`."""
    cfg, eager = tiny()
    _, compiled = tiny()
    compiled.flow.compile_blocks()
    images, labels = batch()
    terms = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(3)  # the same posterior sample and label dropout on both sides
        terms[name], _ = accumulate_gradients(model, images, labels, 0, cfg, micro=4)
    torch.testing.assert_close(terms["compiled"]["total"], terms["eager"]["total"], rtol=1e-5, atol=0)
    grads = 0
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        assert (p_e.grad is None) == (p_c.grad is None), name
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)
            grads += 1
    assert grads > 10 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in compiled.flow.parameters())


def test_train_compile_compiles_the_flow_blocks_before_the_first_step(tmp_path, monkeypatch):
    compiled = []

    def record(flow, **options):
        compiled.append(flow)
        return flow

    monkeypatch.setattr(TransformerFlow, "compile_blocks", record)
    base = TINY + [f"run_dir={tmp_path}", "train.steps=1", "train.global_batch_size=8", "train.warmup_steps=0",
                   "tracking.enabled=false"]
    result = train(load_config(overrides=base + ["train.compile=true"]), DistEnv())
    assert compiled == [result.model.flow]
    train(load_config(overrides=base + [f"run_dir={tmp_path / 'eager'}"]), DistEnv())
    assert len(compiled) == 1  # train.compile=false (the default) compiles nothing


# --------------------------------------------------------------------------------------------
# EMA weights for sampling during training
# --------------------------------------------------------------------------------------------
def test_ema_weights_are_swapped_in_and_back_out_in_place():
    _, model = tiny()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in own.items()}
    params = [p for p in model.parameters()]
    with ema_weights(model, ema) as swapped:
        assert swapped is model and not model.training
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # the optimiser's tensors
