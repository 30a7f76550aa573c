"""Every fast sampling path of simflow.sampling (and the compiled training forward of simflow/flow.py) equals
the plain one within a stated tolerance.

Tolerances (fp32 on CPU): paths that only reorder or regroup the same arithmetic (static-shape cache,
CUDA graph, compiled step, hoisted AdaLN terms, batched CFG) agree with the plain ones to 1e-5 (1e-4 under
guidance, which amplifies differences by up to 1 + w). Jacobi sampling with ``jacobi_tol=0`` runs every
chunk to its exact solution (n iterations for n tokens) and agrees to 1e-5; with ``jacobi_tol > 0`` its
error is bounded below. No test measures time.
"""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from simflow import bench
from simflow.flow import TransformerFlow
from simflow.sampling import (GPU_VERIFIED_MODES, SAMPLING_MODES, LinearGuidance, StaticKVCache,
                             resolve_mode, sample)
from simflow.sampling import sampler as sampler_module


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one thread avoids OpenMP hand-off costs, which dominate (×3–4) on a busy
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "adaln": dict(in_channels=4, img_size=4, patch_size=1, channels=32, layers_per_block=[1, 2], num_classes=5),
    "add_exp": dict(in_channels=2, img_size=4, patch_size=1, channels=32, layers_per_block=[2, 1], num_classes=3,
                    conditioning="add", scale_param="exp", soft_clip=0.0),
    "uncond_patch2": dict(in_channels=3, img_size=8, patch_size=2, channels=32, layers_per_block=[1, 1, 1]),
}


def make(name: str, std: float = 0.1) -> TransformerFlow:
    """A model whose zero-initialised parts are random, so no block is the identity."""
    torch.manual_seed(0)
    model = TransformerFlow(head_dim=16, **CONFIGS[name])
    torch.manual_seed(1234)
    for pname, param in model.named_parameters():
        if (pname.endswith("weight") and param.dim() > 1) or pname.endswith("bias"):
            torch.nn.init.normal_(param, std=std)
    return model.eval()


def inputs(model: TransformerFlow, batch: int = 3):
    z = torch.randn(batch, model.in_channels, model.img_size, model.img_size, generator=torch.Generator().manual_seed(7))
    y = torch.arange(batch) % model.num_classes if model.num_classes else None
    return z, y


def guidance_kwargs(model: TransformerFlow) -> dict:
    """CFG against the null class, or attention-temperature guidance for an unconditional model."""
    kwargs = dict(guidance=1.5, guidance_method=LinearGuidance(annealed=True))
    if model.num_classes == 0:
        kwargs["attn_temp"] = 1.5
    return kwargs


# --------------------------------------------------------------------------------------------
# Static-shape cached step
# --------------------------------------------------------------------------------------------
def test_static_cache_writes_in_place_and_masks_later_slots():
    cache = StaticKVCache(layers=2, batch=1, heads=1, seq_len=4, head_dim=2, device=torch.device("cpu"),
                          dtype=torch.float32)
    assert all(torch.equal(buf, torch.zeros(1, 1, 4, 2)) for buf in cache.keys + cache.values)
    k = torch.full((1, 1, 1, 2), 3.0)
    keys, _ = cache.write_at(1, torch.tensor([2]), k, -k)
    assert keys.shape == (1, 1, 4, 2) and keys.data_ptr() == cache.keys[1].data_ptr()  # in place, no copy
    assert torch.equal(cache.keys[1][0, 0, 2], torch.tensor([3.0, 3.0]))
    assert torch.equal(cache.values[1][0, 0, 2], torch.tensor([-3.0, -3.0]))
    assert cache.keys[0].abs().sum() == 0 and cache.keys[1][0, 0, :2].abs().sum() == 0
    assert cache.mask(torch.tensor([2])).flatten().tolist() == [True, True, True, False]
    # a step's slot writes at its tensor position, and its position tensor is its only state
    slot = cache.at(torch.tensor([1]))
    assert slot.mask.flatten().tolist() == [True, True, False, False]
    q = torch.ones(1, 1, 1, 2)
    out = slot.attend(0, q, k, -k)
    assert torch.equal(cache.keys[0][0, 0, 1], torch.tensor([3.0, 3.0]))
    # slot 0 (zeros) and slot 1 are attended, the later ones masked out
    torch.testing.assert_close(out, torch.softmax(torch.tensor([0.0, 6.0 / math.sqrt(2)]), 0)[1] * -k)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_step_equals_dynamic_cache_equals_uncached(name):
    model = make(name)
    z, y = inputs(model)
    dynamic = sample(model, z, y)
    static = sample(model, z, y, mode="static")
    uncached = sample(model, z, y, mode="uncached")
    assert (dynamic - model(z, y)[0]).abs().max() > 1e-2  # non-trivial: x differs from z
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=0)
    torch.testing.assert_close(dynamic, uncached, atol=1e-5, rtol=0)
    guide = guidance_kwargs(model)
    g_dynamic = sample(model, z, y, **guide)
    assert (g_dynamic - dynamic).abs().max() > 1e-3, "guidance must change the samples"
    torch.testing.assert_close(sample(model, z, y, mode="static", **guide), g_dynamic, atol=1e-4, rtol=0)
    torch.testing.assert_close(sample(model, z, y, mode="uncached", **guide), g_dynamic, atol=1e-4, rtol=0)


def test_samples_invert_the_forward_pass_on_the_static_path():
    model = make("adaln")
    x = torch.randn(2, 4, 4, 4)
    y = torch.tensor([1, 3])
    z, _ = model(x, y)
    torch.testing.assert_close(sample(model, z, y, mode="static"), x, atol=1e-4, rtol=0)


def test_hot_token_loops_make_no_host_syncs(monkeypatch):
    """No value of a tensor is read back into Python inside the cached / static token loops (on a GPU each
    such read is a device synchronisation). Jacobi reads one per iteration by design: it must trip."""
    model = make("adaln")
    z, y = inputs(model)

    def forbidden(*_args, **_kwargs):
        raise RuntimeError("host sync in the sampling loop")

    for attr in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    sample(model, z, y)
    sample(model, z, y, guidance=2.0)
    sample(model, z, y, guidance=2.0, guidance_method="precision", mode="static")
    with pytest.raises(RuntimeError, match="host sync"):
        sample(model, z, y, mode="jacobi", jacobi_block_size=4)


# --------------------------------------------------------------------------------------------
# Block-wise Jacobi sampling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_jacobi_with_zero_tolerance_is_the_exact_inverse(name, chunk):
    model = make(name)
    z, y = inputs(model)
    stats: dict = {}
    jacobi = sample(model, z, y, mode="jacobi", jacobi_block_size=chunk, jacobi_tol=0.0, stats=stats)
    torch.testing.assert_close(jacobi, sample(model, z, y), atol=1e-5, rtol=0)
    t = model.num_tokens
    expected = [min(chunk, t - s) for s in range(0, t, chunk)]  # n tokens need exactly n passes
    assert stats["jacobi_iterations"] == [expected] * len(model.blocks)
    guide = guidance_kwargs(model)
    torch.testing.assert_close(sample(model, z, y, mode="jacobi", jacobi_block_size=chunk, jacobi_tol=0.0, **guide),
                               sample(model, z, y, **guide), atol=1e-4, rtol=0)


def test_jacobi_with_a_position_by_position_strategy():
    """Strategies without ``accepts_position_tensor`` are applied to a chunk one position at a time."""

    class Annealed:
        def __init__(self):
            self.inner = LinearGuidance(annealed=True)
            self.positions = []

        def __call__(self, cond, uncond, weight, position, num_tokens):
            self.positions.append(position)
            return self.inner(cond, uncond, weight, position, num_tokens)

    model = make("adaln")
    z, y = inputs(model)
    strategy = Annealed()
    jacobi = sample(model, z, y, guidance=1.5, guidance_method=strategy, mode="jacobi", jacobi_block_size=8, jacobi_tol=0.0)
    assert all(isinstance(pos, int) for pos in strategy.positions)
    torch.testing.assert_close(jacobi, sample(model, z, y, guidance=1.5, guidance_method=LinearGuidance(annealed=True)),
                               atol=1e-4, rtol=0)


def test_jacobi_stops_early_within_its_tolerance():
    """A weakly coupled flow (weights std 0.02) converges in fewer passes than tokens; the result stays
    within a few tolerances of the sequential inverse, and a tighter tolerance gives a smaller error."""
    model = make("uncond_patch2", std=0.02)
    z, _ = inputs(model)
    exact = sample(model, z)
    errors, passes = [], []
    for tol in (1e-2, 1e-4):
        stats: dict = {}
        x = sample(model, z, mode="jacobi", jacobi_block_size=16, jacobi_tol=tol, stats=stats)
        errors.append((x - exact).abs().max().item())
        passes.append(sum(sum(b) for b in stats["jacobi_iterations"]))
        assert errors[-1] <= 10 * tol
    assert passes[0] < passes[1] < 16 * len(model.blocks), passes
    assert errors[1] < errors[0]


def test_jacobi_max_iter_caps_the_passes():
    model = make("adaln")
    z, y = inputs(model)
    stats: dict = {}
    sample(model, z, y, mode="jacobi", jacobi_block_size=8, jacobi_tol=0.0, jacobi_max_iter=2, stats=stats)
    assert stats["jacobi_iterations"] == [[2, 2]] * 2


# --------------------------------------------------------------------------------------------
# The straightforward TarFlow-style baseline of the benchmark
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_baseline_sampler_equals_production_sampler(name):
    model = make(name)
    z, y = inputs(model)
    torch.testing.assert_close(bench.reference_tarflow_reverse(model, z, y), sample(model, z, y), atol=1e-5, rtol=0)
    guide = guidance_kwargs(model)
    torch.testing.assert_close(bench.reference_tarflow_reverse(model, z, y, **guide), sample(model, z, y, **guide),
                               atol=1e-4, rtol=0)
    if model.num_classes:
        torch.testing.assert_close(
            bench.reference_tarflow_reverse(model, z, y, guidance=2.0, guidance_method="precision"),
            sample(model, z, y, guidance=2.0, guidance_method="precision"), atol=1e-4, rtol=0)


def test_concat_cache_grows_by_concatenation():
    cache = bench.ConcatKVCache(layers=1)
    k = torch.ones(2, 1, 1, 4)
    first, _ = cache.write(0, k, k)
    second, _ = cache.write(0, 2 * k, 2 * k)
    assert second.shape == (2, 1, 2, 4) and second.data_ptr() != first.data_ptr()
    assert torch.equal(second[:, :, 1], 2 * k[:, :, 0])


# --------------------------------------------------------------------------------------------
# torch.compile (the first compilation took 20–30 s per test on the 2-core CPU, hence `slow`)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_static_step_equals_eager():
    model = make("adaln")
    model.blocks = model.blocks[:1]  # one block: one compilation
    model.layers_per_block = model.layers_per_block[:1]
    z, y = inputs(model)
    torch.testing.assert_close(sample(model, z, y, mode="compiled"), sample(model, z, y), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_training_forward_equals_eager():
    eager = make("add_exp")
    compiled = make("add_exp").compile_blocks()
    x = torch.randn(2, 2, 4, 4)
    y = torch.tensor([0, 2])
    z_e, ld_e = eager(x, y)
    z_c, ld_c = compiled(x, y)
    torch.testing.assert_close(z_c, z_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld_c, ld_e, atol=1e-4, rtol=1e-5)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compiling keeps parameter names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_equals_eager_on_gpu():
    model = make("adaln").cuda()
    z, y = inputs(model)
    z, y = z.cuda(), y.cuda()
    torch.testing.assert_close(sample(model, z, y, mode="cuda_graph"), sample(model, z, y), atol=1e-4, rtol=0)
    guide = guidance_kwargs(model)
    torch.testing.assert_close(sample(model, z, y, mode="cuda_graph", **guide), sample(model, z, y, **guide),
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# Option errors
# --------------------------------------------------------------------------------------------
def test_incompatible_sampling_options_raise_clear_errors():
    model = make("adaln")
    z, y = inputs(model)
    with pytest.raises(ValueError, match="'cuda_graph' needs CUDA"):
        sample(model, z.cpu(), y, mode="cuda_graph")  # z on the CPU, whatever the machine has
    with pytest.raises(ValueError, match="unknown sampling mode 'fast'"):
        sample(model, z, y, mode="fast")
    with pytest.raises(ValueError, match="compile_mode is an option of mode 'compiled'"):
        sample(model, z, y, mode="static", compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cannot be combined with mode 'static'"):
        sample(model, z, y, mode="static", jacobi_block_size=4)
    with pytest.raises(ValueError, match="jacobi_block_size ≥ 1"):
        sample(model, z, y, mode="jacobi", jacobi_block_size=0)
    with pytest.raises(ValueError, match="jacobi_block_size ≥ 1"):
        sample(model, z, y, mode="jacobi")  # Jacobi has no default chunk


def test_auto_mode_is_cached_until_a_gpu_run_verifies_a_fast_mode(monkeypatch):
    assert resolve_mode("auto", torch.device("cpu")) == "cached"
    assert resolve_mode("auto", torch.device("cuda")) == ("cached" if not GPU_VERIFIED_MODES
                                                          else GPU_VERIFIED_MODES[0])
    assert resolve_mode("static", torch.device("cpu")) == "static"
    # The registry is the one switch: a verified mode becomes auto on CUDA, never on CPU.
    monkeypatch.setattr(sampler_module, "GPU_VERIFIED_MODES", ("cuda_graph",))
    assert resolve_mode("auto", torch.device("cuda")) == "cuda_graph"
    assert resolve_mode("auto", torch.device("cpu")) == "cached"
    monkeypatch.undo()
    model = make("adaln")
    z, y = inputs(model)
    torch.testing.assert_close(sample(model, z, y, mode="auto"), sample(model, z, y), atol=0, rtol=0)


def test_gpu_verified_modes_are_exact_modes_with_a_gpu_report():
    """auto may only pick an exact mode, and only one the committed GPU report shows passing."""
    assert set(GPU_VERIFIED_MODES) <= set(SAMPLING_MODES) - {"jacobi", "uncached", "cached"}
    report = Path(__file__).resolve().parents[1] / "docs" / "gpu_report.md"
    if GPU_VERIFIED_MODES:
        assert report.exists(), "GPU_VERIFIED_MODES needs docs/gpu_report.md (scripts/gpu_check.sh)"
        text = report.read_text()
        for mode in GPU_VERIFIED_MODES:
            assert f"| {mode} | passed |" in text, f"docs/gpu_report.md does not show {mode} passing"


# --------------------------------------------------------------------------------------------
# The benchmark itself
# --------------------------------------------------------------------------------------------
def run_bench(tmp_path, *argv: str) -> dict:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    assert bench.main(parser.parse_args([*argv, "--out", str(out)])) == 0
    return json.loads(out.read_text())


def test_bench_cli_measures_training_and_sampling(tmp_path):
    result = run_bench(tmp_path, "--preset", "tiny", "--img-size", "4", "--layers", "1,1", "--parts",
                       "train,sample,attention",
                       "--steps", "1", "--warmup", "1", "--sample-repeats", "1", "--sample-warmup", "0",
                       "--device", "cpu", "--jacobi-block-size", "4")
    assert result["config"]["tokens"] == 16 and result["config"]["layers_per_block"] == [1, 1]
    train = result["train"]
    assert train["img_per_s"] > 0 and train["achieved_tflops"] > 0 and train["mfu"] is None  # no CPU peak
    modes = result["sample"]["modes"]
    assert set(modes) == {"uncached", "cached", "static", "cached+cfg", "baseline", "baseline+cfg", "jacobi",
                          "jacobi+cfg"}
    for name, entry in modes.items():
        assert entry["img_per_s"] > 0 and entry["finite"], name
        assert entry["max_abs_diff_vs_cached"] < 1e-3, name  # every mode samples the same images
    assert modes["jacobi"]["mean_iterations"] <= 4
    assert "cached_vs_uncached" in result["sample"]["speedups"]
    assert "cached+cfg_vs_baseline+cfg" in result["sample"]["speedups"]
    attention = result["attention"]
    assert attention["shape"] == [16, 4, 16, 16] and attention["max_abs_diff"] < 1e-5  # same causal attention
    assert result["summary"].startswith("tiny")


def test_bench_loads_flow_weights_from_a_training_checkpoint(tmp_path):
    trained = make("adaln")
    ckpt = tmp_path / "latest.pt"
    torch.save({"ema": {f"flow.{k}": v for k, v in trained.state_dict().items()} | {"vae.w": torch.zeros(1)},
                "model": {}}, ckpt)
    fresh = TransformerFlow(head_dim=16, **CONFIGS["adaln"])
    bench.load_flow_weights(fresh, str(ckpt), "ema")
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    plain = tmp_path / "flow.pt"
    torch.save(trained.state_dict(), plain)
    bench.load_flow_weights(TransformerFlow(head_dim=16, **CONFIGS["adaln"]), str(plain), "ema")
    with pytest.raises(ValueError, match="does not match"):
        bench.load_flow_weights(TransformerFlow(head_dim=16, **CONFIGS["add_exp"]), str(ckpt), "ema")


def test_bench_rejects_unknown_modes_and_parts(tmp_path):
    with pytest.raises(ValueError, match="unknown sampling mode"):
        run_bench(tmp_path, "--parts", "sample", "--modes", "cached,fast", "--device", "cpu")
    with pytest.raises(SystemExit, match="unknown part"):
        run_bench(tmp_path, "--parts", "train,eval", "--device", "cpu")


def test_bench_fid_feature_throughput(tmp_path):
    result = run_bench(tmp_path, "--parts", "fid", "--fid-images", "64", "--fid-batch", "32", "--device", "cpu")
    assert result["fid"]["classifier"]["images"] == 64
    assert result["fid"]["classifier"]["img_per_s"] > 0


REFERENCE_MODULE = '''
"""A reference implementation for the side-by-side training benchmark (test stand-in)."""
import torch

seen = {}


class PlainFlowLoss(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["in_channels"] * cfg["patch_size"] ** 2
        self.net = torch.nn.Linear(d, 2 * d)

    def forward(self, x, y=None):
        tokens = x.flatten(2).transpose(1, 2)
        shift, log_scale = self.net(tokens).chunk(2, -1)
        z = (tokens - shift) * torch.exp(-log_scale)
        return 0.5 * z.pow(2).mean() + log_scale.mean()

    @torch.no_grad()
    def sample(self, z, y=None, guidance=0.0):
        seen["guidance"] = guidance
        tokens = z.flatten(2).transpose(1, 2)
        shift, log_scale = self.net(tokens).chunk(2, -1)
        return (tokens * torch.exp(log_scale) + shift).transpose(1, 2).reshape(z.shape)


class NoSampler(torch.nn.Module):
    def forward(self, x, y=None):
        return x.sum()


def build(cfg):
    seen.update(cfg)
    return PlainFlowLoss(cfg)


def not_a_module(cfg):
    return 42


def no_sampler(cfg):
    return NoSampler()
'''


def test_bench_times_the_training_step_against_a_reference_side_by_side(tmp_path):
    (tmp_path / "ref_impl.py").write_text(REFERENCE_MODULE)
    result = run_bench(tmp_path, "--preset", "tarflow-cpu", "--img-size", "4", "--channels", "64",
                       "--layers", "1,1", "--parts", "train", "--steps", "1", "--warmup", "1",
                       "--device", "cpu", "--reference", "ref_impl:build",
                       "--reference-path", str(tmp_path), "--pair-repeats", "3")
    pair = result["train_vs_reference"]
    assert pair["rounds"] == 3 and len(pair["step_cpu_s_all"]["simflow"]) == 3
    assert len(pair["step_cpu_s_all"]["reference"]) == 3
    assert pair["speed_ratio_cpu"] > 0 and pair["speed_ratio_wall"] > 0
    assert pair["reference_config"] == {"in_channels": 4, "img_size": 4, "patch_size": 1, "channels": 64,
                                        "head_dim": 64, "num_classes": 10, "batch": 32,
                                        "layers_per_block": [1, 1], "conditioning": "add"}
    import ref_impl  # the factory got that config
    assert ref_impl.seen["conditioning"] == "add"
    assert all(math.isfinite(v) for v in pair["loss_after_warmup"].values())
    assert "train vs ref_impl:build" in result["summary"]
    assert result["config"]["conditioning"] == "add"


def test_bench_sample_part_runs_the_sample_stage_sampler_against_a_reference_side_by_side(tmp_path):
    (tmp_path / "ref_impl3.py").write_text(REFERENCE_MODULE)
    result = run_bench(tmp_path, "--preset", "tarflow-cpu", "--img-size", "4", "--channels", "64",
                       "--layers", "1,1", "--parts", "sample", "--modes", "cached+cfg",
                       "--sample-repeats", "1", "--device", "cpu", "--guidance", "2.0",
                       "--reference", "ref_impl3:build", "--reference-path", str(tmp_path),
                       "--pair-repeats", "3")
    pair = result["sample_vs_reference"]
    assert pair["simflow_mode"] == "cached" and pair["guidance"] == 2.0 and pair["sample_batch"] == 8
    assert pair["rounds"] == 3 and all(len(v) == 3 for v in pair["call_cpu_s_all"].values())
    assert pair["speed_ratio_cpu"] > 0 and pair["speed_ratio_wall"] > 0
    import ref_impl3
    assert ref_impl3.seen["guidance"] == 2.0  # the reference samples at the same weight
    assert "sampling (auto, w=2.0) vs ref_impl3:build" in result["summary"]
    (tmp_path / "ref_impl4.py").write_text(REFERENCE_MODULE)
    with pytest.raises(ValueError, match=r"no sample\(z, y, guidance\) method"):
        run_bench(tmp_path, "--preset", "tarflow-cpu", "--img-size", "4", "--channels", "64",
                  "--layers", "1", "--parts", "sample", "--device", "cpu",
                  "--reference", "ref_impl4:no_sampler", "--reference-path", str(tmp_path))


def test_bench_reference_errors_name_the_problem(tmp_path):
    (tmp_path / "ref_impl2.py").write_text(REFERENCE_MODULE)
    with pytest.raises(ValueError, match="expected MODULE:FACTORY"):
        bench.load_reference("ref_impl2")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        bench.load_reference("no_such_module_xyz:build")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        bench.load_reference("ref_impl2:nope", [str(tmp_path)])
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        run_bench(tmp_path, "--preset", "tiny", "--img-size", "4", "--layers", "1", "--parts", "train",
                  "--steps", "1", "--device", "cpu", "--reference", "ref_impl2:not_a_module",
                  "--reference-path", str(tmp_path), "--pair-repeats", "1")
