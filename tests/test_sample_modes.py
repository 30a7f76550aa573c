"""`sample.mode`: the sample stage and the training gFID probe sample through the configured sampler mode,
`auto` is the plain cached path until a GPU run verifies a faster one, and a mode the device cannot run is one clear error."""

import pytest
import torch
import yaml

from simflow import sampling
from simflow.cli import main
from simflow.config import ConfigError, load_config
from simflow.distributed import DistEnv
from simflow.model import build_model
from simflow.sampling import GPU_VERIFIED_MODES
from simflow.stages import generate_images, make_fid_probe, sampling_mode

TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16"]


def sampler_options(monkeypatch, *overrides) -> dict:
    """The options ``generate_images`` hands to :func:`simflow.sampling.sample` under ``overrides``."""
    cfg = load_config(overrides=TINY + list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10).eval()
    seen: dict = {}
    real = sampling.sample

    def spy(flow, z, y=None, guidance=None, **options):
        seen.update(options)
        return real(flow, z, y, guidance, **options)

    monkeypatch.setattr(sampling, "sample", spy)
    out = generate_images(cfg, model, torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    return seen


def test_sample_mode_reaches_the_sampler(monkeypatch):
    assert sampler_options(monkeypatch)["mode"] == "cached"  # auto on the CPU
    assert sampler_options(monkeypatch, "sample.mode=static")["mode"] == "static"
    jacobi = sampler_options(monkeypatch, "sample.mode=jacobi", "sample.jacobi_block_size=4",
                             "sample.jacobi_tol=0.01")
    assert (jacobi["mode"], jacobi["jacobi_block_size"], jacobi["jacobi_tol"]) == ("jacobi", 4, 0.01)
    assert "jacobi_tol" not in sampler_options(monkeypatch, "sample.mode=cached")


def test_auto_is_safe_per_device_and_a_cuda_mode_on_a_cpu_run_is_one_clear_error():
    cfg = load_config(overrides=TINY)
    assert sampling_mode(cfg, torch.device("cpu")) == "cached"
    # auto on CUDA is the plain cached path until a GPU run verifies a faster one
    # (simflow.sampling.GPU_VERIFIED_MODES).
    assert sampling_mode(cfg, torch.device("cuda")) == (GPU_VERIFIED_MODES or ("cached",))[0]
    cuda_only = load_config(overrides=TINY + ["sample.mode=cuda_graph"])
    with pytest.raises(ConfigError, match=r"sample.mode=cuda_graph: .*needs CUDA.*use 'auto'"):
        sampling_mode(cuda_only, torch.device("cpu"))


def test_bad_sample_mode_is_refused_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match=r"sample.mode: 'fast' is not one of \['auto', 'cached'"):
        load_config(overrides=TINY + ["sample.mode=fast"])
    with pytest.raises(ConfigError, match="sample.mode=cuda_graph needs a CUDA device.*gpus_per_node=0"):
        load_config(overrides=TINY + ["sample.mode=cuda_graph", "launcher.gpus_per_node=0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stage runs on the GPU where there is one")
def test_sample_stage_and_fid_probe_refuse_a_cuda_mode_on_the_cpu_before_any_work(tmp_path, capsys):
    config = {"run_dir": str(tmp_path / "run"), "results_root": str(tmp_path), "tracking": {"enabled": False},
              "sample": {"mode": "cuda_graph"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sample", "-c", str(path), "--set", "data.name=digits"]) == 2
    err = capsys.readouterr().err
    assert "sample.mode=cuda_graph" in err and "model.pt" not in err  # before loading the model
    cfg = load_config(overrides=TINY + ["sample.mode=cuda_graph", "train.fid_every=10",
                                        "eval.reference_stats=unused.npz"])
    with pytest.raises(ConfigError, match="sample.mode=cuda_graph"):
        make_fid_probe(cfg, DistEnv())
