"""The training step as the train stage (and `simflow bench`) runs it: `train.compile`, `data.num_workers`,
and the EMA weights swapped in place for the sample grids and gFID probes."""

import pytest
import torch

from simflow.config import load_config
from simflow.data import build_dataset
from simflow.distributed import DistEnv
from simflow.classifier import train_feature_extractor
from simflow.flow import TransformerFlow
from simflow.model import build_model
from simflow.train import StepBatches, accumulate_gradients, collate, make_train_loader, train
from simflow.weights import ema_weights

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
# data.num_workers
# --------------------------------------------------------------------------------------------
def test_data_num_workers_reaches_the_training_loader_which_yields_the_step_batches():
    cfg = load_config(overrides=TINY + ["data.num_workers=2", "train.steps=4", "train.global_batch_size=8"])
    dataset = build_dataset("digits", None, "train", 8)
    batches = StepBatches(len(dataset), 8, cfg.train.seed)
    loader = make_train_loader(cfg, dataset, batches, 1, rank=1, world_size=2)
    assert loader.num_workers == 2
    got = list(loader)
    assert len(got) == 3  # steps 1, 2, 3: from the start step to train.steps
    for step, (images, labels) in zip((1, 2, 3), got, strict=True):
        expected_images, expected_labels = collate(dataset, batches.indices(step, 1, 2))
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_the_training_loader_leaves_the_training_rng_alone():
    """The loader seeds its workers from its own generator: resuming stays exact."""
    cfg = load_config(overrides=TINY + ["train.steps=2", "train.global_batch_size=8"])
    dataset = build_dataset("digits", None, "train", 8)
    state = torch.get_rng_state()
    next(iter(make_train_loader(cfg, dataset, StepBatches(len(dataset), 8, 0), 0, 0, 1)))
    assert torch.equal(torch.get_rng_state(), state)


def test_feature_extractor_loaders_use_data_num_workers(tmp_path, monkeypatch):
    seen = []
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        seen.append(kwargs.get("num_workers", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    dataset = build_dataset("digits", None, "train", 8)
    train_feature_extractor(dataset, tmp_path / "classifier.pt", steps=2, batch_size=8, width=4,
                            feature_dim=8, device="cpu", num_workers=1)
    assert seen == [1, 1]  # the training and the accuracy loader


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


def test_training_resumed_after_its_last_step_returns_without_rewriting_checkpoints(tmp_path):
    """A requeued job of a finished run (submitit's checkpoint() after the last step) resumes at
    train.steps: it must return the trained model and leave latest.pt / previous.pt as they are."""
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path}", "train.steps=2", "train.global_batch_size=8",
                                        "train.warmup_steps=0", "train.checkpoint_every=1",
                                        "tracking.enabled=false"])
    first = train(cfg, DistEnv())
    ckpts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").glob("*.pt")}
    again = train(cfg, DistEnv())
    assert again.summary["steps"] == 2 and again.summary["finished"] and again.summary["final_loss"] is None
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").glob("*.pt")} == ckpts
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
