"""One typed, validated configuration for every stage (YAML in, resolved YAML out).

The configuration is plain nested dataclasses. Every field has a default and a ``help`` text
(``config/README.md`` and ``simflow config --describe`` are generated from them). Loading checks
every key and type and fails with one :class:`ConfigError` naming the key path::

    cfg = load_config("run.yaml", overrides=["train.lr=3e-4", "flow.layers_per_block=[2,2,8]"])
    save_config(cfg, cfg.run_dir + "/config.yaml")

Values marked INFERRED or NOT PUBLISHED (not stated by the SimFlow paper; ``docs/sources.md``)
are options here, with the documented default named in their help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from simflow.contracts import BACKENDS, MODEL_MODES
from simflow.io import write_text


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and how to fix it."""


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, min_len: int | None = None,
           max_len: int | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a default and a description (mutable defaults are copied).

    ``ge``/``gt``/``le``/``lt`` bound a number (every item of a list of numbers), ``min_len`` /
    ``max_len`` the length of a list; :func:`from_dict` refuses values outside, naming the key.
    """
    metadata: dict[str, Any] = {"help": help}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    if min_len is not None or max_len is not None:
        metadata["length"] = (min_len, max_len)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: Literal["digits", "fashion_mnist", "imagefolder"] = option(
        "fashion_mnist", "Dataset: `digits` (scikit-learn, for tests), `fashion_mnist` (the demo; "
        "Debian's dataset-fashion-mnist or data.root), `imagefolder` (ImageNet: root/train; the "
        "held-out split that the evaluation reads is root/val).")
    root: str | None = option(None, "Dataset folder, used as given (missing data there is an error, "
                              "never replaced by another copy). None: the dataset's default locations.")
    image_size: int = option(32, "Training resolution in pixels (ImageNet: ADM centre crop).", ge=1)
    hflip: bool = option(False, "Random horizontal flips in training.")
    num_workers: int = option(0, "DataLoader worker processes per rank, for the training batches "
                              "and the feature-extractor classifier's (0: load in the training "
                              "process, the only setting with exactly reproducible random flips "
                              "on resume).", ge=0)
    on_bad_file: Literal["error", "skip"] = option(
        "error", "An image file that cannot be read or decoded (imagefolder: a truncated JPEG): "
        "`error` stops, naming it; `skip` leaves it out (its place in the batch goes to the next "
        "readable file), logging each skipped path; the count reaches MLflow "
        "(data/skipped_files) and the training summary (skipped_files).")


@dataclass
class VAEConfig:
    latent_channels: int = option(4, "Latent channels d (paper: 64, the f16d64 VAE, INFERRED).", ge=1)
    base_channels: int = option(32, "Channels of the first encoder level (REPA-E f16: 128).", ge=1)
    channel_mult: list[int] = option([1, 2, 2], "Channel multiplier per level; the downsampling "
                                     "factor is 2^(len − 1) (paper f16: [1, 1, 2, 2, 4], INFERRED).",
                                     ge=1, min_len=1, max_len=5)
    num_res_blocks: int = option(1, "ResNet blocks per level (REPA-E: 2).", ge=1)
    attn_resolutions: list[int] = option([], "Spatial sizes with self-attention (REPA-E: [16]).", ge=1)
    posterior: Literal["fixed", "learnable", "layernorm"] = option(
        "fixed", "`fixed`: std ≡ fixed_std (SimFlow); `learnable`: predicted log-variance; "
        "`layernorm`: LayerNorm on the mean + predicted log-variance (the paper's LN, INFERRED).")
    fixed_std: float = option(0.5, "σ̄ of the fixed posterior (paper: 0.5, i.e. variance 0.25).", gt=0)
    logvar_init: float = option(0.0, "Initial log-variance of the learnable / layernorm posteriors "
                                "(the bias of its output). 0, the source recipe's: LDM / REPA-E's "
                                "AutoencoderKL predicts it with the encoder's last convolution and no "
                                "offset (σ ≈ 1 at step 0), so whatever variance it ends at is learned. "
                                "A start at −6.9 (σ 0.03) imposes the small-variance regime: at 300 steps "
                                "σ stays near its start from any start (config/logvar_sweep.yaml, README).")
    dropout: float = option(0.0, "Dropout inside ResNet blocks.", ge=0, lt=1)


@dataclass
class FlowConfig:
    patch_size: int = option(1, "Patch size p on the latent (or pixel) map (paper: 1, INFERRED).", ge=1)
    channels: int = option(128, "Transformer width (paper: 1152).", ge=1)
    layers_per_block: list[int] = option([2, 2, 4], "Depth of each flow block, data → noise; the "
                                         "last is the deep one (paper: [2, 2, 2, 2, 2, 46], INFERRED).",
                                         ge=1, min_len=1)
    head_dim: int = option(32, "Attention head size (TarFlow/STARFlow: 64).", ge=1)
    class_conditional: bool = option(True, "Condition on the class label (needed for CFG).")
    conditioning: Literal["adaln", "add"] = option(
        "adaln", "`adaln` (the paper's run name says adaln) or `add` (TarFlow's class embedding).")
    label_drop: float = option(0.1, "Label dropout for CFG training (TarFlow/STARFlow: 0.1).", ge=0, lt=1)
    scale_param: Literal["softplus", "exp"] = option(
        "softplus", "Affine scale parametrisation: STARFlow's softplus (default) or TarFlow's exp.")
    soft_clip: float = option(4.0, "tanh soft-clip of the raw scale output (STARFlow: 4); 0 = off.", ge=0)


@dataclass
class ModelConfig:
    mode: Literal[MODEL_MODES] = option(
        "end_to_end", "`end_to_end`: VAE + flow jointly from scratch, no stop-gradient (SimFlow); "
        "`frozen_vae`: pretrained VAE frozen, flow on its latents; `frozen_encoder`: encoder frozen, "
        "decoder fine-tuned on noisy latents (STARFlow); `pixel`: TarFlow on image patches, no VAE.")
    pretrained_vae: str | None = option(None, "Checkpoint of `simflow pretrain-vae` (frozen modes).")
    decoder_scale: float | Literal["calibrated"] | None = option(
        "calibrated", "Rate weighting (the paper's weight is NOT PUBLISHED): the scale b of a Laplace "
        "decoder, in pixel units on the [−1, 1] scale, so that L1 + w·NLL is its ELBO with "
        "w = l1_weight·b·D_lat/D_pix on the per-dim NLL. `calibrated`: b = the batch's mean absolute "
        "reconstruction error, the maximum-likelihood scale (calibrated decoder, arXiv 2006.13202). "
        "null: use model.nll_weight. Applies in end_to_end mode; the flow NLL has weight 1 elsewhere.",
        gt=0)
    nll_weight: float | None = option(None, "Raw weight w of the flow NLL (reduced per "
                                      "nll_reduction) when model.decoder_scale is null. w = 1 on the "
                                      "per-dim NLL equals b = D_pix/D_lat (4 in the demo): it collapses "
                                      "the encoder (README).", ge=0)
    nll_reduction: Literal["per_dim", "per_sample"] = option(
        "per_dim", "With a raw nll_weight: `per_dim` (nats per latent dimension, TarFlow/STARFlow) or "
        "`per_sample` (nats per sample). Irrelevant with a decoder_scale.")
    include_entropy: bool = option(True, "Subtract the posterior entropy H(q) from the NLL (the "
                                   "ELBO term; a constant for the fixed posterior).")
    l1_weight: float = option(1.0, "L1 reconstruction weight (REPA-E: 1).", ge=0)
    mse_weight: float = option(0.0, "MSE reconstruction weight.", ge=0)
    lpips_weight: float = option(0.0, "LPIPS weight (REPA-E: 1); 0 loads nothing.", ge=0)
    lpips_backbone_weights_path: str | None = option(None, "Local VGG weights for LPIPS (offline).")
    adv_weight: float = option(0.0, "PatchGAN hinge generator weight (REPA-E: 0.1); 0 = no GAN.", ge=0)
    adv_start_step: int = option(0, "Step at which the adversarial loss starts.", ge=0)
    disc_channels: int = option(32, "Discriminator base channels.", ge=1)
    disc_layers: int = option(2, "Discriminator depth (PatchGAN n_layers; 3 at 256 px).", ge=1)
    kl_weight: float = option(1e-6, "KL(q‖N(0,I)) weight (REPA-E: 1e-6, per-sample sum).", ge=0)
    latent_noise_std: float = option(0.0, "Gaussian noise σ added to the flow's input: latent "
                                     "augmentation in frozen modes (STARFlow: 0.3), pixel noise in "
                                     "`pixel` mode (TarFlow ImageNet-64: 0.05).", ge=0)
    noise_type: Literal["gaussian", "uniform"] = option(
        "gaussian", "Pixel mode: `gaussian` augmentation (generation) or `uniform` dequantisation "
        "(likelihood, TarFlow's bits/dim).")
    latent_source: Literal["sample", "mean"] = option(
        "sample", "Frozen modes: flow on posterior samples (STARFlow) or posterior means.")
    latent_scale: float | None = option(None, "Frozen modes: latents are multiplied by this; None "
                                        "= 1/std of the pretrained VAE's latents, measured once.", gt=0)
    repa_weight: float = option(0.0, "REPA alignment weight of the flow, relative to the weight of "
                                "the flow's NLL (REPA-E: 0.5 beside its generative loss of weight 1); "
                                "0 = off.", ge=0)
    repa_vae_weight: float = option(1.5, "End-to-end mode with REPA on: alignment weight of the VAE, "
                                    "relative to its reconstruction weight l1_weight (REPA-E's "
                                    "vae_align_proj_coeff 1.5; SimFlow's value NOT PUBLISHED, INFERRED "
                                    "from REPA-E); 0 = the VAE gets only the flow's share.", ge=0)
    repa_layer: int = option(3, "Flow transformer layer aligned by REPA, counted from the data "
                             "side from 0 (paper run name: repaAlign3; exact meaning NOT RETRIEVED).",
                             ge=0)
    repa_target: Literal["classifier", "dinov2_vitb14"] = option(
        "classifier", "REPA target encoder: the demo's frozen Fashion-MNIST classifier "
        "(`simflow feature-extractor`) or DINOv2-B (local weights).")
    repa_target_weights_path: str | None = option(None, "Checkpoint / hub dir of the REPA target.")
    repa_hidden: int = option(2048, "Hidden width of the REPA projector MLP (REPA: 2048).", ge=1)

    def __post_init__(self) -> None:
        if self.decoder_scale is not None and self.nll_weight is not None:
            raise ConfigError("model.nll_weight and model.decoder_scale are both set; the decoder "
                              "scale defines the weight: set model.decoder_scale: null to use the "
                              "raw model.nll_weight")
        if self.decoder_scale is None and self.nll_weight is None:
            raise ConfigError("model.decoder_scale is null but model.nll_weight is not set: give one "
                              "(decoder_scale: calibrated is the default)")
        if self.decoder_scale is not None and self.mode == "end_to_end" and self.l1_weight <= 0:
            raise ConfigError("model.decoder_scale derives the NLL weight from the L1 term, but "
                              "model.l1_weight is 0: set model.decoder_scale: null and model.nll_weight")


@dataclass
class TrainConfig:
    steps: int = option(2000, "Optimisation steps.", ge=1)
    global_batch_size: int = option(64, "Global batch (paper: 256 = 16 GPUs × 16, INFERRED); the "
                                    "per-rank batch and accumulation are derived from the world size.",
                                    ge=1)
    micro_batch_size: int | None = option(None, "Largest per-rank forward batch; None = global / world.", ge=1)
    lr: float = option(1e-3, "Flow learning rate (TarFlow/STARFlow: 1e-4 at scale).", ge=0)
    vae_lr: float = option(1e-3, "VAE learning rate (REPA-E: 1e-4).", ge=0)
    disc_lr: float = option(1e-3, "Discriminator learning rate (REPA-E: 1e-4).", ge=0)
    betas: list[float] = option([0.9, 0.95], "AdamW betas (TarFlow: 0.9, 0.95).", ge=0, lt=1, min_len=2, max_len=2)
    weight_decay: float = option(1e-4, "AdamW weight decay on ≥2-D weights (TarFlow: 1e-4).", ge=0)
    warmup_steps: int = option(100, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = option(0.01, "Cosine decay floor as a fraction of the peak lr.", ge=0, le=1)
    grad_clip: float = option(1.0, "Gradient-norm clip per optimiser (REPA-E: 1), in units of the "
                              "optimiser's anchor term: the flow's NLL weight, the VAE's l1_weight "
                              "(SimFlowModel.gradient_units), so it means the same in every mode; "
                              "0 = off.", ge=0)
    ema_decay: float = option(0.999, "EMA decay of flow and VAE (REPA-E: 0.9999); 0 = off.", ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "`auto`: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = option(False, "torch.compile every flow block's forward for training "
                           "(TransformerFlow.compile_blocks; the first steps pay the compilation; on "
                           "CPU it needs a C++ compiler). Checkpoints are unchanged.")
    seed: int = option(0, "Global seed (per-rank seed = seed·world + rank).")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (exact CPU resume).")
    log_every: int = option(20, "Steps between metric logs (the rate monitor too).", ge=1)
    collapse_threshold: float = option(0.05, "Rate (nats per latent dim above the posterior-entropy "
                                       "floor) below which the encoder counts as collapsed; measured: "
                                       "0.02 collapsed, ≥ 0.3 healthy in the demo (README).", ge=0)
    collapse_min_active_fraction: float = option(
        0.5, "The collapse alarm also fires when fewer than this fraction of the latent dims are "
        "active (their μ varies across images by more than 0.1 σ; simflow.rate): a partial collapse, "
        "most dims at the prior and a few busy ones, which the mean rate hides. Healthy demo and "
        "claims-study variants: 1.0.", ge=0, le=1)
    collapse_patience: int = option(3, "Consecutive log steps after warm-up with a collapse criterion "
                                    "met (rate below collapse_threshold, or active dims below "
                                    "collapse_min_active_fraction) that raise the collapse alarm (a "
                                    "warning and an MLflow tag).", ge=1)
    fid_every: int = option(0, "Steps between gFID probes on train.fid_samples EMA samples (Figure 2 "
                            "of the paper: gFID during training); 0 = off. Needs eval.reference_stats.", ge=0)
    fid_samples: int = option(200, "Samples per gFID probe (a small-sample FID: biased high, "
                              "comparable across steps and variants at equal count).", ge=2)
    sample_every: int = option(0, "Steps between sample grids (0 = only at the end).", ge=0)
    checkpoint_every: int = option(200, "Steps between checkpoints (latest.pt; the one before is kept "
                                  "as previous.pt until the new one is verified).", ge=0)
    keep_every: int = option(0, "Also keep step_XXXXXXX.pt every N steps (0 = none).", ge=0)
    resume: str = option("auto", "`auto` (latest checkpoint if any), `never`, or a checkpoint path.")
    resume_mismatch: Literal["error", "allow"] = option(
        "error", "A checkpoint written with another model or objective (any key outside "
        "simflow.checkpoints.RESUMABLE_KEYS: config/README.md, \"Resuming\"): `error` stops, listing "
        "the keys old -> new; `allow` resumes it anyway with a warning (weights of another shape "
        "are still an error).")
    max_steps_this_run: int | None = option(None, "Stop (checkpointed) after this many steps in "
                                            "this process; for tests of resume. None = no limit.", ge=0)


@dataclass
class SampleConfig:
    num_samples: int = option(1000, "Samples to generate (paper protocol: 50 000).", ge=1)
    batch_size: int = option(100, "Samples per forward batch (per rank).", ge=1)
    labels: Literal["balanced", "uniform"] = option("balanced", "Class labels: equal counts, or uniform random.")
    guidance: float = option(0.0, "CFG scale w (0 = none). SimFlow's value: NOT RETRIEVED.")
    guidance_method: str = option("linear", "`linear` (TarFlow), `precision` (STARFlow); the "
                                  "paper's revised CFG is NOT RETRIEVED: register it in simflow/sampling/guidance.py.")
    guide: Literal["shift", "scale", "both"] = option("both", "Linear guidance: what is extrapolated.")
    annealed: bool = option(False, "Anneal w over the token index (TarFlow's FID setting).")
    attn_temp: float | None = option(None, "Attention temperature τ of the unconditional branch "
                                     "(guidance of unconditional models); None = null class.", gt=0)
    temperature: float = option(1.0, "Std of the prior noise.", ge=0)
    denoise: bool = option(False, "Tweedie denoising x + s·σ²∇log p(x) with σ = latent_noise_std.")
    denoise_step_scale: float = option(1.0, "s of the denoising step (1 = theoretical optimum).")
    use_ema: bool = option(True, "Sample from the EMA weights.")
    seed: int = option(0, "Base seed; sample i's noise is seeded by (seed, i), independent of GPUs.")
    mode: Literal["auto", "cached", "static", "compiled", "cuda_graph", "jacobi", "uncached"] = option(
        "auto", "Sampler (simflow.sampling). `auto`: `cached` (the KV-cached token loop) on CPU, and on "
        "CUDA too until a GPU run verifies a faster mode (simflow.sampling.GPU_VERIFIED_MODES, from "
        "docs/gpu_report.md). `cuda_graph`: the static-shape token step captured as one CUDA graph "
        "per block and replayed per token. `static`: the static-shape step, "
        "eager; `compiled`: it through torch.compile (a compilation per process; on CPU it needs a "
        "C++ compiler); `jacobi`: block-wise Jacobi (STARFlow), approximate within sample.jacobi_tol; "
        "`uncached`: a full causal pass per token (the slow reference). `cuda_graph` on a CPU run is "
        "an error.")
    jacobi_block_size: int = option(16, "sample.mode=jacobi: tokens per chunk solved by parallel "
                                    "fixed-point iteration.", ge=1)
    jacobi_tol: float = option(1e-3, "sample.mode=jacobi: a chunk stops iterating when no element "
                               "changes by more than this (in the flow's units; 0 = exact, as many "
                               "passes as tokens).", ge=0)


@dataclass
class EvalConfig:
    feature_extractor: str = option("inception-v3-compat", "torch-fidelity extractor; the demo "
                                    "uses `simflow-classifier` (an honest proxy, not Inception).")
    feature_extractor_weights_path: str | None = option(None, "Local Inception weights (offline).")
    classifier_path: str | None = option(None, "Checkpoint of `simflow feature-extractor`.")
    reference_stats: str | None = option(None, "Reference statistics .npz (ours, or ADM's "
                                         "VIRTUAL_imagenet256_labeled.npz); None: computed by fid-ref.")
    num_reference: int = option(10000, "Images used for reference statistics (None-like: all).", ge=1)
    isc: bool = option(True, "Inception score.")
    kid: bool = option(True, "KID, the unbiased small-sample metric the gFID claims are decided on "
                              "(from the reference file's features, else from reference images).")
    prc: bool = option(False, "Precision/recall (needs reference images).")
    num_recon: int = option(1000, "Images for rFID / PSNR in `reconstruct`.", ge=1)
    noise_levels: list[float] = option([0.0, 0.25, 0.5, 0.75, 1.0], "Latent-noise stds of "
                                       "Figure 3a (reconstruction under latent noise).", ge=0)
    num_nll: int = option(1000, "Test images for `nll` (bits/dim).", ge=1)
    num_classify: int = option(500, "Test images that `nll` classifies by Bayes' rule, the argmin "
                               "over classes of the flow's conditional NLL (class-conditional "
                               "flows; accuracy in nll.json; binomial std error ≤ 2.3 points at "
                               "500); 0 = skip.", ge=0)
    guidance_weights: list[float] = option([], "CFG weights of the `guidance` stage's sweep (samples "
                                           "and gFID per weight from the one trained model); empty: "
                                           "no sweep.", ge=0)
    num_latents: int = option(512, "Validation images encoded by `latents`.", ge=1)
    classifier_steps: int = option(1500, "Training steps of the demo feature extractor.", ge=1)


@dataclass
class PreflightConfig:
    """What `simflow preflight` rehearses; set by the workflow from the study's `preflight:`
    section and the real stage's launcher (config/README.md, "The preflight")."""

    stage: Literal["train", "pretrain-vae"] = option(
        "train", "The training stage rehearsed: `train` (a variant) or `pretrain-vae` (the shared VAE).")
    steps: int = option(200, "Optimisation steps of the rehearsal (the real run's train.steps is "
                        "only used to project its wall-clock).")
    target_world_size: int = option(1, "Ranks (GPUs) of the real run: its per-GPU batch and "
                                    "accumulation are rehearsed, and its wall-clock projected, for this layout.")
    cpu_overrides: dict = option({}, "Stage-config overrides applied when the rehearsal runs on a CPU "
                                 "(a stated reduced scale; the report lists them).")

    def __post_init__(self) -> None:
        for key in ("steps", "target_world_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"preflight.{key}: {value} must be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = option(True, "Log to MLflow.")
    tracking_uri: str | None = option(None, "MLflow URI; None: $MLFLOW_TRACKING_URI, else "
                                      "sqlite under results_root/mlflow.db.")
    experiment: str = option("simflow", "MLflow experiment (one per study).")
    run_id_file: str | None = option(None, "File holding this variant's MLflow run id (written by "
                                     "the workflow); None: a run is created in run_dir.")


@dataclass
class LauncherSection:
    backend: Literal[BACKENDS] = option(
        "local", "`local`: in-process; `submitit-local`: a submitit subprocess; `slurm`: sbatch via submitit.")
    partition: str | None = option(None, "SLURM partition.")
    account: str | None = option(None, "SLURM account.")
    qos: str | None = option(None, "SLURM QoS.")
    constraint: str | None = option(None, "SLURM constraint (e.g. a GPU type).")
    nodes: int = option(1, "Nodes per job (paper: 2).", ge=1)
    gpus_per_node: int = option(1, "GPUs per node; one task per GPU (paper: 8).", ge=0)
    tasks_per_node: int | None = option(None, "Tasks per node; None = gpus_per_node (1 on CPU).", ge=1)
    cpus_per_task: int = option(8, "CPUs per task.", ge=1)
    mem_gb: float | None = option(None, "Memory per node in GB (None: the cluster default).", gt=0)
    timeout_min: int = option(60, "Job time limit; training requeues and resumes on timeout.", ge=1)
    signal_delay_s: int = option(120, "Seconds before the limit at which SLURM signals the job.", ge=0)
    max_num_timeout: int = option(20, "How often a timed-out job is requeued.", ge=0)
    extra_sbatch: dict = option({}, "Other sbatch parameters, e.g. {mail-type: END}.")
    setup: list[str] = option([], "Shell lines run before the job (module load, conda activate).")
    log_dir: str = option("logs/submitit", "Folder of submitit's job logs (%j = job id).")

    def __post_init__(self) -> None:
        """The checks across keys (each key's type and range are its option's)."""
        if self.timeout_min * 60 <= self.signal_delay_s + 30:
            need = math.floor((self.signal_delay_s + 30) / 60) + 1
            raise ConfigError(
                f"launcher.timeout_min={self.timeout_min} is too short for signal_delay_s="
                f"{self.signal_delay_s}: the checkpoint signal is sent signal_delay_s before the time "
                f"limit, so the job would be signalled (and requeued) almost at once. Use "
                f"timeout_min >= {need}, or lower signal_delay_s below {self.timeout_min * 60 - 30}.")
        for key in self.extra_sbatch:
            owner = _OWNED_SBATCH.get(str(key).lstrip("-").replace("-", "_"))
            if owner is not None:
                raise ConfigError(f"launcher.extra_sbatch sets {key!r}, which the launcher sets itself; "
                                  f"use {owner} instead")
        if self.backend == "submitit-local" and self.nodes != 1:
            raise ConfigError(f"launcher.backend submitit-local runs on this machine only: set nodes=1 "
                              f"(got {self.nodes})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "LauncherSection":
        """The section from a plain mapping (``config["launcher"]``), validated: every key, type and
        range, then the checks across keys. An empty ``extra_sbatch:`` / ``setup:`` (None in YAML)
        is the default."""
        data = {k: v for k, v in dict(data or {}).items()
                if not (k in ("extra_sbatch", "setup") and v is None)}
        return from_dict(cls, data, "launcher")

    def effective_tasks_per_node(self) -> int:
        """Tasks started per node: the explicit value, else one per GPU, else 1 (CPU)."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(1, self.gpus_per_node)


#: sbatch options that the launcher sets itself: in ``extra_sbatch`` they would emit a second,
#: conflicting #SBATCH line (submitit writes both); the key that sets each instead.
_OWNED_SBATCH = {
    "partition": "launcher.partition", "account": "launcher.account", "qos": "launcher.qos",
    "constraint": "launcher.constraint", "nodes": "launcher.nodes",
    "ntasks_per_node": "launcher.tasks_per_node", "cpus_per_task": "launcher.cpus_per_task",
    "mem": "launcher.mem_gb", "gpus_per_node": "launcher.gpus_per_node",
    "time": "launcher.timeout_min", "signal": "launcher.signal_delay_s",
    "job_name": "the job name given to launch()", "output": "launcher.log_dir", "error": "launcher.log_dir",
}


@dataclass
class Config:
    study: str = option("demo", "Study name: one MLflow experiment and results/<study>/.")
    variant: str = option("simflow", "Variant name: one MLflow child run and results/<study>/<variant>/.")
    run_dir: str = option("results/demo/simflow", "Folder of this variant's checkpoints and outputs.")
    results_root: str = option("results", "Root of all studies (holds mlflow.db by default).")
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherSection = field(default_factory=LauncherSection)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_type in options:
            if option_type is type(None):
                continue
            try:
                return _coerce(value, option_type, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: {value!r} is not any of {[_type_name(o) for o in options]}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_type,) = get_args(tp)
        return [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean '{f'{path}.{close[0]}' if path else close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{where}'{hint}; valid keys{' of ' + path if path else ''}: "
                          f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            _check_range(kwargs[f.name], f.metadata, f"{path}.{f.name}" if path else f.name)
    return cls(**kwargs)


def _range_text(bounds: dict) -> str:
    low = [f"{_BOUNDS[k]} {v:g}" for k, v in bounds.items() if k in ("ge", "gt")]
    high = [f"{_BOUNDS[k]} {v:g}" for k, v in bounds.items() if k in ("le", "lt")]
    return " and ".join(low + high)


def _check_range(value: Any, metadata: Any, path: str) -> None:
    """Refuse a value outside the ``bounds`` / ``length`` of its :func:`option`."""
    if value is None:
        return
    if "length" in metadata and isinstance(value, list):
        lo, hi = metadata["length"]
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            want = (f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None
                    else f"at most {hi}" if lo is None else f"{lo} to {hi}")
            raise ConfigError(f"{path}: {value!r} has {len(value)} entries; expected {want}")
    bounds = metadata.get("bounds")
    if not bounds:
        return
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = ((("ge" not in bounds) or v >= bounds["ge"]) and (("gt" not in bounds) or v > bounds["gt"])
              and (("le" not in bounds) or v <= bounds["le"]) and (("lt" not in bounds) or v < bounds["lt"]))
        if not ok or v != v:  # NaN passes no comparison; v != v catches it where none applies
            where = path if i is None else f"{path}[{i}]"
            raise ConfigError(f"{where}: {v!r} is out of range; it must be {_range_text(bounds)}")


def validate(cfg: Config) -> Config:
    """Checks across keys that no single key's range can express; raises :class:`ConfigError`
    naming the keys. Called by :func:`load_config` and for every unit of a study, so a bad
    combination fails before any job starts. Returns ``cfg``."""
    m, v, f, d = cfg.model, cfg.vae, cfg.flow, cfg.data
    size = d.image_size
    if m.mode == "pixel":
        if size % f.patch_size:
            raise ConfigError(f"data.image_size={size} is not divisible by flow.patch_size="
                              f"{f.patch_size} (model.mode=pixel: the patches tile the image)")
    else:
        factor = 2 ** (len(v.channel_mult) - 1)
        if size % factor:
            raise ConfigError(
                f"data.image_size={size} is not divisible by the VAE's downsampling factor {factor} "
                f"(2^(len(vae.channel_mult) − 1), vae.channel_mult={v.channel_mult}); change the "
                "image size or the number of VAE levels")
        if (size // factor) % f.patch_size:
            raise ConfigError(
                f"the latent size {size // factor} (data.image_size={size} / the VAE's factor "
                f"{factor}) is not divisible by flow.patch_size={f.patch_size}")
    if f.channels % f.head_dim:
        raise ConfigError(f"flow.channels={f.channels} is not divisible by flow.head_dim={f.head_dim}")
    depth = sum(f.layers_per_block)
    if m.repa_weight > 0 and m.repa_layer >= depth:
        raise ConfigError(f"model.repa_layer={m.repa_layer} does not exist: the flow has {depth} "
                          f"transformer layers (flow.layers_per_block={f.layers_per_block}), counted "
                          f"from 0; use 0 to {depth - 1}")
    if cfg.sample.mode == "cuda_graph" and cfg.launcher.gpus_per_node == 0:
        raise ConfigError("sample.mode=cuda_graph needs a CUDA device, but launcher.gpus_per_node=0 "
                          "makes this a CPU run: use sample.mode=auto (the cached loop on CPU)")
    t = cfg.train
    if t.micro_batch_size is not None and t.micro_batch_size > t.global_batch_size:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} exceeds "
                          f"train.global_batch_size={t.global_batch_size}")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; values in ``update`` win, nested mappings are merged."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping (the YAML spec requires
    unique keys; PyYAML keeps the last one silently, so two ``seeds:`` lines, or a variant's block
    pasted twice with edits, would run with whichever came last). The error is a YAML error at
    the second key, naming the line of the first; merge keys (``<<: *base``) may still be
    overridden, as YAML intends."""


def _construct_unique_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; SafeLoader refuses it itself
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in the same mapping (first at line "
                f"{first.start_mark.line + 1}); remove one of them", key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def strict_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text`` with :class:`StrictLoader` (a duplicated key is a YAML error)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` → ``{"train": {"lr": 3e-4}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = strict_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem, and its context with the place it refers to (e.g. where an unclosed
    bracket was opened), without its ``in "<unicode string>"`` marks."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context, mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if not context:
        return problem
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem} ({context}{at})"


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path``, read strictly (:class:`StrictLoader`: a key given twice is
    an error); a syntax error is a :class:`ConfigError` that names the file, line and column
    (``file:line:column: ...``, as compilers do)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return strict_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: {what} is not valid YAML{at}: {_yaml_problem(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Read a YAML file (or a mapping), apply ``key.path=value`` overrides, validate (types,
    ranges, and the cross-key checks of :func:`validate`)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if data:
        raw = deep_merge(raw, data)
    for text in overrides or []:
        raw = deep_merge(raw, parse_override(text))
    return validate(from_dict(Config, raw))


def save_config(cfg: Config, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key path, type, default, help) for every option, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def json_schema(cls: type = Config) -> dict:
    """A JSON schema (draft 2020-12) of ``cls`` with defaults and descriptions, for Snakemake."""
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            props[f.name] = json_schema(tp)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        props[f.name] = {**_json_type(tp), **_json_bounds(tp, f.metadata), "default": default,
                         "description": f.metadata.get("help", "")}
    return {"type": "object", "additionalProperties": False, "properties": props}


def _json_bounds(tp: Any, metadata: Any) -> dict:
    """The :func:`option` ranges as JSON-schema keywords (they apply only to values of their type,
    so ``minimum`` beside ``anyOf: [integer, null]`` leaves null alone)."""
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    numeric = {names[k]: v for k, v in metadata.get("bounds", {}).items()}
    out: dict[str, Any] = {}
    if get_origin(tp) is list:
        if numeric:
            out["items"] = {**_json_type(get_args(tp)[0]), **numeric}
    else:  # a scalar, or `list[...] | None`, where minItems applies to the list alone
        out.update(numeric)
    lo, hi = metadata.get("length", (None, None))
    if lo is not None:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return out


def _json_type(tp: Any) -> dict:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_json_type(a) for a in get_args(tp)]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _json_type(get_args(tp)[0])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object",
              type(None): "null"}
    return {"type": simple[tp]}
