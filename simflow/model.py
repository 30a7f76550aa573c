"""The joint model of the study: a VAE and a flow (or the flow alone on pixels) and their losses.

One :class:`SimFlowModel` serves every variant of the paper's study; the training mode decides
which parts learn and where gradients go:

``end_to_end`` (SimFlow and the learnable-σ / LayerNorm variants)
    x = μ + σ·ε from the encoder (σ ≡ σ̄ for the fixed posterior); loss = reconstruction terms +
    w·NLL_flow(x) − w·H(q). **No stop-gradient**: the flow's NLL reaches the encoder.
``frozen_vae``
    A pretrained VAE, fully frozen; the flow learns its latents, optionally with Gaussian latent
    noise augmentation (TarFlow/STARFlow), removed at sampling time by Tweedie denoising.
``frozen_encoder``
    The encoder is frozen; the decoder is fine-tuned on the noise-augmented latents (STARFlow's
    decoder fine-tuning); the flow learns the noisy latents.
``pixel``
    TarFlow itself: the flow on image patches with Gaussian noise augmentation (generation) or
    uniform dequantisation (likelihood, :func:`dequantise`), no VAE.

The balance of rate and distortion (``model.decoder_scale``; the paper's value is NOT
PUBLISHED). The pixel terms are per-pixel means; the flow NLL is in nats per latent dimension.
``L1_mean + w·NLL_per_dim`` is, up to a factor, the ELBO of a **Laplace decoder with scale b**
(in pixel units on the [−1, 1] scale) when ``w = b·D_lat/D_pix``: −log p(i|x) = Σ|i − x̂|/b + const.
``decoder_scale: b`` sets b directly; ``calibrated`` (the default) sets b each step to the mean
absolute reconstruction error, the maximum-likelihood Laplace scale (a calibrated decoder, Rybkin
et al., "σ-VAE", arXiv 2006.13202), so the rate is weighed as the ELBO of the best-fitting decoder
would weigh it: measured on the previous step's whole global batch, so that every rank and
micro-batch uses the same b (``simflow.train.DecoderScale``), and floored at the data's
quantisation step (:data:`QUANTISATION_STEP`). ``decoder_scale: null`` uses the raw
``nll_weight`` instead, reduced per ``nll_reduction``. A weight of 1 on the per-dim NLL is
b = D_pix/D_lat (4 in the demo, 12 for ImageNet-256 at f16d64): a β-VAE with β ≈ 40 that
collapses the encoder (README, "Choosing the rate weight"). The weighting matters only where the NLL's gradient meets the pixel losses'
(``end_to_end``); in the other modes the flow NLL has weight 1 unless ``nll_weight`` is given.

Terms weighed against the NLL move with w (REPA-E's balance, arXiv 2504.10483): the flow's REPA
alignment has ``repa_weight`` × w, the VAE's ``repa_vae_weight`` × ``l1_weight``, and gradients are
clipped in those units (:meth:`SimFlowModel.gradient_units`), so that the same config means the
same balance in every mode and at every w (tests/test_objective_balance.py measures it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from simflow import sampling
from simflow.classifier import classifier_patch_tokens
from simflow.config import Config, ModelConfig
from simflow.contracts import DECODER_TRAINING_MODES, FROZEN_MODES, MODEL_MODES
from simflow.flow import TransformerFlow
from simflow.losses import (PatchDiscriminator, REPAProjector, adversarial_weight,
                            build_perceptual_loss, build_target_encoder, generator_adversarial_loss,
                            hinge_discriminator_loss, kl_loss, reconstruction_loss,
                            repa_alignment_loss, resample_tokens)
from simflow.rate import rate_statistics
from simflow.vae import VAE, DiagonalGaussian


#: nats per dimension from a density of :func:`dequantise` d pixels on [−1, 1) to one on the 0..256
#: scale of the 8-bit values: the change of variables of TarFlow's ``evaluate_bpd.py`` (its
#: ``−log 128`` per dimension), so bits/dim = (NLL/D + log 128)/ln 2.
DEQUANTISED_LOG_SCALE = math.log(128.0)


def dequantise(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """TarFlow's uniform dequantisation of 8-bit pixels x = v/127.5 − 1 (v ∈ 0..255): v + u with
    u ~ U[0, 1), mapped onto [−1, 1) by (v + u)/128 − 1, as its ``train.py`` (noise_type uniform)
    and ``evaluate_bpd.py`` do. A density of the result is one of v + u scaled by 1/128 per
    dimension (:data:`DEQUANTISED_LOG_SCALE`)."""
    u = torch.rand_like(x) if generator is None else torch.rand(
        x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    return ((x + 1.0) * 127.5 + u) / 128.0 - 1.0


@dataclass
class LossOutput:
    """``total``: the scalar to back-propagate; ``terms``: detached scalars to log; ``recon``: the
    (detached) reconstruction for the discriminator step, or None when no decoder is trained."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    recon: Tensor | None = None


class SimFlowModel(nn.Module):
    """VAE (optional) + flow + loss modules of one variant; see the module docstring.

    Shapes: images (B, C_img, H, W) in [-1, 1]; labels (B,) int64 or None; the flow models maps of
    shape ``flow_input_shape`` = (C_lat, H/f, W/f) (or the image shape in ``pixel`` mode).
    """

    def __init__(self, cfg: ModelConfig, flow: TransformerFlow, vae: VAE | None = None,
                 perceptual: nn.Module | None = None, discriminator: nn.Module | None = None,
                 repa_projector: nn.Module | None = None, repa_target: nn.Module | None = None,
                 vae_only: bool = False):
        """``vae_only``: train the autoencoder alone (``pretrain-vae``): no flow term at all."""
        super().__init__()
        if cfg.mode not in MODEL_MODES:
            raise ValueError(f"unknown model.mode {cfg.mode!r}; known: {MODEL_MODES}")
        if (vae is None) != (cfg.mode == "pixel"):
            raise ValueError(f"model.mode={cfg.mode!r} {'needs no' if vae else 'needs a'} VAE")
        self.cfg = cfg
        self.mode = cfg.mode
        self.vae_only = vae_only
        if vae_only and self.mode != "end_to_end":
            raise ValueError("VAE pre-training trains the whole autoencoder: model.mode must be end_to_end")
        self.flow = flow
        self.vae = vae
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.repa_projector = repa_projector
        self.repa_target = repa_target
        # Frozen modes rescale the pretrained latents to unit std before the flow (STARFlow's
        # scaling factor); measured once from data unless configured, saved with the weights.
        self.register_buffer("latent_scale", torch.tensor(cfg.latent_scale or 1.0))
        self.register_buffer("latent_scale_set", torch.tensor(cfg.latent_scale is not None))
        self.apply_freezing()

    # ---- which parameters learn --------------------------------------------------------------
    def apply_freezing(self) -> None:
        if self.mode == "frozen_vae":
            self.vae.requires_grad_(False)
        elif self.mode == "frozen_encoder":
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def train(self, mode: bool = True) -> "SimFlowModel":
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout); perceptual/REPA targets are always frozen.
        if self.mode == "frozen_vae":
            self.vae.eval()
        elif self.mode == "frozen_encoder":
            self.vae.encoder.eval()
        for frozen in (self.perceptual, self.repa_target):
            if frozen is not None:
                frozen.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per optimiser: ``flow`` (flow + REPA projector), ``vae``, ``disc``."""
        groups = {"flow": [p for p in self.flow.parameters() if p.requires_grad]}
        if self.repa_projector is not None:
            groups["flow"] += list(self.repa_projector.parameters())
        if self.vae is not None:
            vae_params = [p for p in self.vae.parameters() if p.requires_grad]
            if vae_params:
                groups["vae"] = vae_params
        if self.discriminator is not None and self.mode in DECODER_TRAINING_MODES:
            groups["disc"] = list(self.discriminator.parameters())
        return groups

    # ---- latent plumbing ---------------------------------------------------------------------
    @property
    def flow_input_shape(self) -> tuple[int, int, int]:
        f = self.flow
        return (f.in_channels, f.img_size, f.img_size)

    @torch.no_grad()
    def calibrate_latent_scale(self, batches: list[Tensor]) -> float:
        """Frozen modes: set latent_scale = 1/std of the pretrained VAE's latents over the image
        ``batches`` (pooled over all of them)."""
        if self.mode not in FROZEN_MODES or bool(self.latent_scale_set):
            return float(self.latent_scale)
        latents = torch.cat([self._frozen_latents(images, scaled=False)[0].float().flatten() for images in batches])
        self.latent_scale.fill_(1.0 / latents.std().clamp(min=1e-6).item())
        self.latent_scale_set.fill_(True)
        return float(self.latent_scale)

    def _frozen_latents(self, images: Tensor, scaled: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """The frozen encoder's latents (before noise augmentation) and the Gaussian they are
        drawn from, both in flow units when ``scaled``."""
        with torch.no_grad():
            posterior = self.vae.encode(images)
            latents = posterior.sample() if self.cfg.latent_source == "sample" else posterior.mode()
        scale = self.latent_scale if scaled else 1.0
        std = posterior.std * scale if self.cfg.latent_source == "sample" else torch.zeros_like(posterior.mean)
        return latents * scale, DiagonalGaussian(posterior.mean * scale, std)

    def encode_latents(self, images: Tensor, sample: bool = True) -> tuple[Tensor, Tensor]:
        """Images → (posterior mean, latent the flow models), both in the flow's units."""
        if self.vae is None:
            return images, images
        posterior = self.vae.encode(images)
        scale = self.latent_scale if self.mode != "end_to_end" else 1.0
        latents = posterior.sample() if sample else posterior.mode()
        return posterior.mode() * scale, latents * scale

    def decode_latents(self, x: Tensor) -> Tensor:
        """Flow-space map → images in [-1, 1] (unclamped)."""
        if self.vae is None:
            return x
        scale = self.latent_scale if self.mode != "end_to_end" else 1.0
        return self.vae.decode(x / scale)

    def add_noise(self, x: Tensor) -> Tensor:
        """Noise augmentation of the flow's input (frozen and pixel modes)."""
        std = self.cfg.latent_noise_std
        if self.mode == "pixel" and self.cfg.noise_type == "uniform":
            return dequantise(x)
        return x + std * torch.randn_like(x) if std > 0 else x

    # ---- the objective -----------------------------------------------------------------------
    def rate_weight(self, decoder_scale: Tensor | float | None, image_dims: int) -> Tensor | float:
        """Weight w of the flow's NLL in nats per latent dim (see the module docstring).

        ``decoder_scale``: the current estimate of the calibrated scale b (pixel units on the
        [−1, 1] scale), needed for ``decoder_scale: calibrated`` and floored there at
        :data:`QUANTISATION_STEP`; ``image_dims``: C·H·W of one image. Raw ``nll_weight`` values
        are converted to this per-dim form when ``nll_reduction`` is ``per_sample``.
        """
        cfg = self.cfg
        if cfg.decoder_scale is None:
            per_sample = cfg.nll_reduction == "per_sample"
            return cfg.nll_weight * (self.flow.num_dims if per_sample else 1.0)
        if self.mode != "end_to_end":
            return 1.0
        if cfg.decoder_scale == "calibrated":
            if decoder_scale is None:
                raise ValueError("model.decoder_scale=calibrated needs the current estimate of b")
            b = torch.clamp(torch.as_tensor(decoder_scale, dtype=torch.float32), min=QUANTISATION_STEP)
        else:
            b = cfg.decoder_scale
        return cfg.l1_weight * b * self.flow.num_dims / image_dims

    def gradient_units(self, decoder_scale: Tensor | float | None, image_dims: int) -> dict[str, float]:
        """Per optimiser, the weight of the term its gradient is measured against: the flow's
        NLL weight w (its REPA term is a fixed fraction of it), the VAE's reconstruction weight
        (``l1_weight``, the anchor of REPA-E's VAE loss), 1 for the discriminator.
        ``train.grad_clip`` is applied in these units, so a clip of 1 bounds the gradient of the
        flow's own objective in every mode, whatever w is (arguments as :meth:`rate_weight`)."""
        units = {"disc": 1.0}
        if not self.vae_only:  # VAE pre-training has no flow term
            units["flow"] = float(self.rate_weight(decoder_scale, image_dims))
        if self.vae is not None:
            units["vae"] = self.cfg.l1_weight if self.cfg.l1_weight > 0 else 1.0
        return units

    def _flow_posterior(self, images: Tensor) -> tuple[Tensor, DiagonalGaussian | None, Tensor | None]:
        """(flow input x, the Gaussian x is drawn from or None for pixels, reconstruction or None)."""
        if self.mode == "end_to_end":
            posterior = self.vae.encode(images)
            x = posterior.sample()
            return x, posterior, self.vae.decode(x)
        if self.mode == "pixel":
            return self.add_noise(images), None, None
        latents, source = self._frozen_latents(images)
        x = self.add_noise(latents)
        # the flow sees N(s·μ, s²σ² + n²): the frozen posterior convolved with the augmentation
        std = (source.std.pow(2) + self.cfg.latent_noise_std ** 2).sqrt()
        posterior = DiagonalGaussian(source.mean, std)
        recon = self.vae.decode(x / self.latent_scale) if self.mode == "frozen_encoder" else None
        return x, posterior, recon

    def training_losses(self, images: Tensor, labels: Tensor | None, step: int,
                        decoder_scale: Tensor | float | None = None) -> LossOutput:
        """All loss terms of one batch; see the module docstring for what each mode trains.

        ``decoder_scale``: the calibrated scale b of this step, the same on every rank and
        micro-batch (the training loop's :class:`simflow.train.DecoderScale`); None uses this
        batch's own mean absolute reconstruction error (calls outside the training loop)."""
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        x, posterior, recon = self._flow_posterior(images)
        total = torch.zeros((), device=images.device)

        rec = None
        if recon is not None:
            rec = reconstruction_loss(recon, images, cfg.l1_weight, cfg.mse_weight)
            terms["reconstruction"] = rec.detach()
            terms["recon_mae"] = (recon.detach() - images).abs().float().mean()
            total = total + rec
            if self.perceptual is not None and cfg.lpips_weight > 0:
                lp = self.perceptual(recon, images)
                terms["lpips"] = lp.detach()
                total = total + cfg.lpips_weight * lp
            w_adv = adversarial_weight(step, cfg.adv_start_step, cfg.adv_weight)
            if self.discriminator is not None and w_adv > 0:
                self.discriminator.requires_grad_(False)  # the generator step must not train D
                adv = generator_adversarial_loss(self.discriminator(recon))
                self.discriminator.requires_grad_(True)
                terms["adversarial"] = adv.detach()
                total = total + w_adv * adv
            terms["psnr"] = psnr(recon.detach(), images)

        out, nll, weight = None, None, 1.0
        repa_on = cfg.repa_weight > 0 and self.repa_projector is not None and not self.vae_only
        # REPA-E aligns the VAE's latents too, with its own coefficient (an align-only pass)
        vae_repa = repa_on and self.mode == "end_to_end" and cfg.repa_vae_weight > 0
        if vae_repa and self.flow.class_embed is not None and self.training and self.flow.label_drop > 0:
            labels = self.flow.drop_labels(labels)  # once, shared by both passes
        if not self.vae_only:
            out = self.flow.to_noise(x, labels, hidden_layer=cfg.repa_layer if repa_on else None,
                                     drop_labels=not vae_repa)
            nll = self.flow.nll_from(out.z, out.logdet)  # (B,) nats
            d = self.flow.num_dims
            terms["nll_per_dim"] = nll.detach().mean() / d
            terms["logdet_per_dim"] = out.logdet.detach().mean() / d
            terms["z_sq"] = out.z.detach().float().pow(2).mean()
            prior_term = nll
            if self.mode == "end_to_end" and cfg.include_entropy:
                prior_term = nll - posterior.entropy()  # −log p_θ(x) + log q(x|i): the ELBO's prior KL
            if decoder_scale is None and cfg.decoder_scale == "calibrated":
                decoder_scale = terms.get("recon_mae")
            weight = self.rate_weight(decoder_scale, images[0].numel())
            terms["nll_weight"] = torch.as_tensor(weight, dtype=torch.float32).detach()
            total = total + weight * prior_term.mean() / d

        if posterior is not None:
            entropy = posterior.entropy() if bool((posterior.std > 0).all()) else None
            terms.update(rate_statistics(posterior.mean, posterior.std, nll, entropy))
            if self.mode == "end_to_end" and cfg.kl_weight > 0:
                kl = kl_loss(posterior)
                terms["kl"] = kl.detach()
                total = total + cfg.kl_weight * kl
        if repa_on:
            # REPA-E's balance: the flow's alignment at repa_weight (0.5) × the weight of its
            # generative loss (here w, the NLL's), the VAE's at repa_vae_weight (1.5) × the weight
            # of its reconstruction loss, whatever w is. The flow's pass also sends its
            # alignment gradient into x; the align-only pass with the flow's and projector's
            # parameters held fixed tops the VAE's share up to its own coefficient.
            target = resample_tokens(self.repa_target(images), int(math.isqrt(out.hidden.shape[1])))
            repa = repa_alignment_loss(self.repa_projector(out.hidden), target)
            terms["repa"] = repa.detach()
            flow_coeff = cfg.repa_weight * weight
            total = total + flow_coeff * repa
            if vae_repa:
                with frozen_parameters(self.flow, self.repa_projector):
                    hidden = self.flow.hidden_state(x, labels, cfg.repa_layer)
                    repa_vae = repa_alignment_loss(self.repa_projector(hidden), target)
                total = total + (cfg.repa_vae_weight * cfg.l1_weight - flow_coeff) * repa_vae
        terms["total"] = total.detach()
        return LossOutput(total, terms, None if recon is None else recon.detach())

    def discriminator_loss(self, images: Tensor, recon: Tensor, step: int) -> Tensor | None:
        """Hinge loss of the PatchGAN on real images vs (detached) reconstructions, or None."""
        if self.discriminator is None or adversarial_weight(step, self.cfg.adv_start_step,
                                                            self.cfg.adv_weight) == 0:
            return None
        return hinge_discriminator_loss(self.discriminator(images), self.discriminator(recon.detach()))

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise: Tensor, labels: Tensor | None, guidance: float | None = None,
                 denoise: bool = False, denoise_step_scale: float = 1.0, **sample_options) -> Tensor:
        """Prior noise (B, *flow_input_shape) → images in [-1, 1] (clamped).

        The flow is inverted by :func:`simflow.sampling.sample` (``sample_options``: its mode,
        guidance method and options). ``denoise`` applies the Tweedie step with
        σ = ``latent_noise_std`` to the flow's sample before decoding (the noise-augmented
        baselines; SimFlow needs none).
        """
        x = sampling.sample(self.flow, noise, labels, guidance=guidance, **sample_options)
        if denoise and self.cfg.latent_noise_std > 0:
            x = self.flow.denoise(x, self.cfg.latent_noise_std, labels, denoise_step_scale)
        return self.decode_latents(x).clamp(-1, 1)


#: The quantisation step of 8-bit images on the [−1, 1] scale: the floor of the calibrated
#: decoder scale b (a Laplace decoder sharper than the data's own resolution is not a density
#: model of that data, and without a floor the rate weight anneals to zero as reconstructions
#: sharpen).
QUANTISATION_STEP = 2.0 / 255.0


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module):
    """Within the block, the parameters of ``modules`` take no gradient (the graph built there
    treats them as constants); gradients still flow through the modules to their inputs."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def psnr(recon: Tensor, target: Tensor) -> Tensor:
    """Mean PSNR in dB of images on the [-1, 1] scale (peak-to-peak 2)."""
    mse = (recon.clamp(-1, 1) - target).float().pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


def build_vae(cfg: Config, image_channels: int) -> VAE:
    """The autoencoder of ``cfg.vae`` (freshly initialised) for images of ``cfg.data``."""
    v = cfg.vae
    return VAE(in_channels=image_channels, latent_channels=v.latent_channels,
               base_channels=v.base_channels, channel_mult=tuple(v.channel_mult),
               num_res_blocks=v.num_res_blocks, attn_resolutions=tuple(v.attn_resolutions),
               posterior=v.posterior, fixed_std=v.fixed_std, logvar_init=v.logvar_init,
               dropout=v.dropout, resolution=cfg.data.image_size)


def build_model(cfg: Config, image_channels: int, num_classes: int, vae_only: bool = False) -> SimFlowModel:
    """Everything one variant needs, from its resolved config (``vae_only``: VAE pre-training)."""
    m, f = cfg.model, cfg.flow
    vae = None
    if m.mode != "pixel":
        vae = build_vae(cfg, image_channels)
        channels, size = vae.latent_shape(cfg.data.image_size)[:2]
    else:
        channels, size = image_channels, cfg.data.image_size
    flow = TransformerFlow(channels, size, f.patch_size, f.channels, f.layers_per_block,
                           num_classes=num_classes if f.class_conditional else 0,
                           head_dim=f.head_dim, conditioning=f.conditioning,
                           label_drop=f.label_drop, scale_param=f.scale_param,
                           soft_clip=f.soft_clip)
    trains_decoder = m.mode in DECODER_TRAINING_MODES
    perceptual = (build_perceptual_loss(m.lpips_weight, backbone_weights_path=m.lpips_backbone_weights_path)
                  if trains_decoder else None)
    discriminator = (PatchDiscriminator(image_channels, m.disc_channels, m.disc_layers,
                                        image_size=cfg.data.image_size)
                     if trains_decoder and m.adv_weight > 0 else None)
    projector = target = None
    if m.repa_weight > 0:
        target = build_repa_target(cfg)
        with torch.no_grad():
            probe = target(torch.zeros(1, image_channels, cfg.data.image_size, cfg.data.image_size))
        projector = REPAProjector(f.channels, probe.shape[-1], m.repa_hidden)
    return SimFlowModel(m, flow, vae, perceptual, discriminator, projector, target, vae_only=vae_only)


def build_repa_target(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.repa_target == "classifier":
        if not m.repa_target_weights_path:
            raise ValueError("model.repa_target=classifier needs model.repa_target_weights_path: the "
                             "checkpoint written by `simflow feature-extractor`")
        return build_target_encoder("module", module=classifier_patch_tokens(m.repa_target_weights_path))
    return build_target_encoder(m.repa_target, m.repa_target_weights_path)
