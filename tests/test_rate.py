"""The rate monitor, the calibrated decoder scale, the collapse alarm and invalid claims."""

import math

import pandas as pd
import pytest
import torch

from simflow.analysis.summary import evaluate_claims, results_markdown
from simflow.config import ConfigError, load_config
from simflow.model import build_model
from simflow.distributed import DistEnv
from simflow.rate import CollapseMonitor, is_collapsed, rate_statistics
from simflow.train import train
from simflow.vae import VAE, DiagonalGaussian

TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16"]


def fixed_entropy(n: int, dims: int, sigma: float) -> torch.Tensor:
    return torch.full((n,), 0.5 * dims * math.log(2 * math.pi * math.e * sigma ** 2))


def test_a_constant_encoder_has_the_floor_rate_and_no_active_dims():
    """An encoder that outputs the same μ for every image, with a prior equal to its posterior:
    NLL = H(q) on average, rate ≈ 0, no active dimension, zero spread."""
    torch.manual_seed(0)
    n, shape, sigma = 4096, (2, 2, 2), 0.5
    mean = torch.full((n, *shape), 0.3)
    x = mean + sigma * torch.randn(n, *shape)
    dims = x[0].numel()
    # −log N(x; 0.3, σ²) per image: the best prior for a constant encoder
    nll = (0.5 * ((x - 0.3) / sigma) ** 2 + 0.5 * math.log(2 * math.pi * sigma ** 2)).flatten(1).sum(1)
    stats = rate_statistics(mean, torch.full_like(mean, sigma), nll, fixed_entropy(n, dims, sigma))
    assert abs(float(stats["rate_per_dim"])) < 0.02
    assert float(stats["active_fraction"]) == 0.0
    assert float(stats["mu_spread_rel"]) == 0.0
    assert float(stats["entropy_per_dim"]) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * 0.25))
    assert is_collapsed(float(stats["rate_per_dim"]), 0.05)


def test_an_informative_encoder_is_active_and_above_the_floor():
    """μ spread 2 against σ = 0.5 under a standard-normal-ish prior: rate well above 0, all active."""
    torch.manual_seed(0)
    n, shape, sigma = 4096, (2, 2, 2), 0.5
    mean = 2.0 * torch.randn(n, *shape)
    x = mean + sigma * torch.randn(n, *shape)
    var = 4.0 + sigma ** 2  # the aggregate posterior is N(0, 4.25): the best Gaussian prior
    nll = (0.5 * x ** 2 / var + 0.5 * math.log(2 * math.pi * var)).flatten(1).sum(1)
    stats = rate_statistics(mean, torch.full_like(mean, sigma), nll, fixed_entropy(n, 8, sigma))
    # the rate equals the Gaussian channel's information ½·log(1 + 4/0.25) nats per dim
    assert float(stats["rate_per_dim"]) == pytest.approx(0.5 * math.log(17.0), rel=0.05)
    assert float(stats["active_fraction"]) == 1.0
    assert float(stats["mu_spread_rel"]) == pytest.approx(4.0, rel=0.05)
    assert float(stats["rate_bits_per_image"]) == pytest.approx(8 * float(stats["rate_per_dim"]) / math.log(2))
    assert not is_collapsed(float(stats["rate_per_dim"]), 0.05)


def test_a_deterministic_latent_has_no_rate_or_relative_spread():
    stats = rate_statistics(torch.randn(8, 2, 2, 2), torch.zeros(8, 2, 2, 2), torch.zeros(8), None)
    assert "rate_per_dim" not in stats and "mu_spread_rel" not in stats
    assert float(stats["posterior_std"]) == 0.0


def test_calibrated_scale_is_the_mean_absolute_error():
    """decoder_scale=calibrated weighs the per-dim NLL by MAE·D_lat/D_pix (a Laplace decoder at
    its maximum-likelihood scale b = MAE); a fixed b by b·D_lat/D_pix."""
    torch.manual_seed(0)
    model = build_model(load_config(overrides=TINY), 1, 10).train()
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    out = model.training_losses(images, torch.arange(6), 0)
    d_lat, d_pix = model.flow.num_dims, 64
    torch.manual_seed(0)
    posterior = model.vae.encode(images)
    assert out.terms["recon_mae"] > 0
    assert float(out.terms["nll_weight"]) == pytest.approx(float(out.terms["recon_mae"]) * d_lat / d_pix, rel=1e-5)
    fixed = build_model(load_config(overrides=TINY + ["model.decoder_scale=0.2"]), 1, 10)
    assert float(fixed.training_losses(images, torch.arange(6), 0).terms["nll_weight"]) == pytest.approx(0.2 * d_lat / d_pix)
    assert posterior.mean.shape[1:].numel() == d_lat


def test_raw_weight_and_decoder_scale_are_exclusive():
    with pytest.raises(ConfigError, match="model.decoder_scale: null"):
        load_config(overrides=["model.nll_weight=1.0"])
    with pytest.raises(ConfigError, match="decoder_scale: -1.0 is out of range; it must be > 0"):
        load_config(overrides=["model.decoder_scale=-1"])
    with pytest.raises(ConfigError, match="l1_weight is 0"):
        load_config(overrides=["model.l1_weight=0"])
    cfg = load_config(overrides=["model.decoder_scale=null", "model.nll_weight=0.5"])
    model = build_model(load_config(overrides=TINY + ["model.decoder_scale=null", "model.nll_weight=0.5"]), 1, 10)
    assert cfg.model.nll_weight == 0.5 and model.rate_weight(None, 64) == 0.5


def test_frozen_modes_report_the_rate_of_the_noise_augmented_latent():
    model = build_model(load_config(overrides=TINY + ["model.mode=frozen_vae", "vae.posterior=learnable",
                                                      "model.latent_noise_std=0.3"]), 1, 10).train()
    out = model.training_losses(torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6), 0)
    # the flow sees N(sμ, s²σ² + 0.3²): its std is at least the augmentation's
    assert float(out.terms["posterior_std"]) >= 0.3
    assert "rate_per_dim" in out.terms and float(out.terms["nll_weight"]) == 1.0


def monitor(warmup_steps=10):
    return CollapseMonitor(0.05, 0.5, 3, warmup_steps=warmup_steps)


def test_alarm_fires_on_a_collapsed_run_and_not_on_a_healthy_one():
    collapsed, healthy = monitor(), monitor()
    fired_c = [collapsed.update(step, {"rate_per_dim": 0.02}) for step in range(0, 80, 10)]
    fired_h = [healthy.update(step, {"rate_per_dim": 0.5, "active_fraction": 1.0}) for step in range(0, 80, 10)]
    assert fired_c.count(True) == 1 and collapsed.alarm_step == 40  # steps 20, 30, 40 after warm-up
    assert collapsed.alarm_reason == "rate 0.0200 nats/dim < 0.05"
    assert not any(fired_h) and healthy.alarm_step is None
    # a dip that recovers does not fire
    dip = monitor(warmup_steps=0)
    assert not any(dip.update(s, {"rate_per_dim": r})
                   for s, r in zip(range(1, 6), [0.01, 0.01, 0.5, 0.01, 0.01], strict=True))
    # a resumed run continues the count from the checkpoint's state
    resumed = CollapseMonitor(0.05, 0.5, 3, 0, dip.state())
    assert resumed.update(6, {"rate_per_dim": 0.01}) and resumed.alarm_step == 6


def partially_collapsed_posterior(n=512, busy_channels=1, sigma=0.5):
    """4 latent channels of which only ``busy_channels`` carry the image (μ spread 4σ); the
    others sit at the prior (μ ≡ 0). The NLL is set so that the busy channel's rate makes the
    mean rate 0.2 nats/dim: healthy by the mean-rate criterion alone."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(n, 4, 2, 2)
    mean[:, :busy_channels] = 4 * sigma * torch.randn(n, busy_channels, 2, 2, generator=gen)
    std = torch.full_like(mean, sigma)
    dims = mean[0].numel()
    entropy = fixed_entropy(n, dims, sigma)
    return rate_statistics(mean, std, entropy + 0.2 * dims, entropy)


def test_partial_collapse_trips_the_alarm_that_the_mean_rate_misses():
    stats = {k: float(v) for k, v in partially_collapsed_posterior().items()}
    assert stats["rate_per_dim"] == pytest.approx(0.2) and stats["active_fraction"] == 0.25
    assert not is_collapsed(stats["rate_per_dim"], 0.05)  # the old, mean-rate-only alarm
    alarm = monitor(warmup_steps=0)
    assert [alarm.update(s, stats) for s in (1, 2, 3)] == [False, False, True]
    assert alarm.alarm_reason == "25% of the latent dims active < 50%"
    healthy = {k: float(v) for k, v in partially_collapsed_posterior(busy_channels=4).items()}
    assert healthy["active_fraction"] == 1.0
    calm = monitor(warmup_steps=0)
    assert not any(calm.update(s, healthy) for s in (1, 2, 3, 4))


def test_training_an_encoder_with_most_channels_at_the_prior_raises_the_alarm(tmp_path, monkeypatch):
    """Through the training loop: an encoder whose channels 1–3 are forced to the prior (μ = 0)
    is flagged in the summary, with the active-dims reason."""
    original = VAE.encode

    def three_channels_at_the_prior(self, images):
        posterior = original(self, images)
        mask = torch.ones_like(posterior.mean)
        mask[:, 1:] = 0
        return DiagonalGaussian(posterior.mean * mask, posterior.std)

    monkeypatch.setattr(VAE, "encode", three_channels_at_the_prior)
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path}", "train.steps=12", "train.global_batch_size=16",
                                        "train.warmup_steps=2", "train.log_every=2", "train.collapse_patience=2",
                                        "train.checkpoint_every=0", "tracking.enabled=false"])
    summary = train(cfg, DistEnv()).summary
    assert summary["collapse_alarm_step"] == 6 and summary["collapsed"] is True
    assert "of the latent dims active < 50%" in summary["collapse_alarm_reason"]
    assert summary["rate"]["active_fraction"] <= 0.25


def summary_rows(collapsed_variant: str | None) -> pd.DataFrame:
    rows = []
    for variant, fid in (("simflow", 20.0), ("frozen_vae", 40.0), ("e2e_learnable", 50.0), ("simflow_repa", 15.0)):
        rows.append({"variant": variant, "group": "latent", "fid": fid, "total_variation": 0.5,
                     "autocorrelation": 0.5, "rate_per_dim": 0.01 if variant == collapsed_variant else 0.4,
                     "collapsed": "true" if variant == collapsed_variant else "false"})
    return pd.DataFrame(rows)


def test_a_claim_over_a_collapsed_variant_is_invalid():
    claims = {c["id"]: c for c in evaluate_claims(summary_rows("simflow"))}
    assert claims["gfid_vs_frozen_vae"]["reproduced"] is None
    assert "simflow has a collapsed encoder (1 of 1 seed, rate 0.01 nats/dim)" in claims["gfid_vs_frozen_vae"]["invalid"]
    assert claims["repa_gfid"]["invalid"]  # simflow is compared there too
    text = results_markdown(summary_rows("simflow"), list(claims.values()))
    assert "1. **invalid**" in text and "**collapsed encoder**" in text
    healthy = {c["id"]: c for c in evaluate_claims(summary_rows(None))}
    # one seed: a point estimate, never a verdict, and not invalid
    assert healthy["gfid_vs_frozen_vae"]["verdict"] == "point estimate (one seed)"
    assert "invalid" not in healthy["gfid_vs_frozen_vae"]
    assert claims["gfid_vs_frozen_vae"]["verdict"] == "invalid" and claims["gfid_vs_frozen_vae"]["p_holm"] is None


def test_collapse_flags_read_back_from_csv_are_recognised(tmp_path):
    path = tmp_path / "per_seed.csv"
    summary_rows("frozen_vae").to_csv(path, index=False)
    claims = {c["id"]: c for c in evaluate_claims(pd.read_csv(path))}
    assert "frozen_vae has a collapsed encoder" in claims["smoothness"]["invalid"]
    assert "invalid" not in claims["repa_gfid"]


def test_noise_claim_reports_the_drop_in_each_vaes_own_latent_units():
    """Two VAEs whose PSNR depends only on noise relative to their latent std: the raw-unit drop
    favours the larger latent, the relative-unit drops are equal."""
    rows = []
    for variant, posterior, latent_std in (("simflow", "fixed σ̄=0.5", 2.0), ("e2e_learnable", "learnable", 0.5)):
        for noise in (0.0, 0.5, 1.0):
            rel = noise / latent_std
            rows.append({"variant": variant, "posterior": posterior, "noise_std": noise, "noise_rel": rel,
                         "psnr": 25.0 - 4.0 * rel})
    claim = evaluate_claims(summary_rows(None), pd.DataFrame(rows))[2]
    # raw units: 25 → 23 dB against 25 → 17 dB (one seed: a point estimate)
    assert claim["verdict"] == "point estimate (one seed)" and claim["mean_diff"] == pytest.approx(-6.0)
    assert "at noise 0.5× the std of its latent means: simflow loses 2.00 dB, e2e_learnable 2.00 dB" in claim["evidence"]
