"""One typed, validated configuration for every stage (YAML in, resolved YAML out).

The configuration is plain nested dataclasses. Every field has a default and a ``help`` text
(``config/README.md`` and ``simflow config --describe`` are generated from them). Loading checks
every key and type and fails with one :class:`ConfigError` naming the key path::

    cfg = load_config("run.yaml", overrides=["train.lr=3e-4", "flow.layers_per_block=[2,2,8]"])
    save_config(cfg, cfg.run_dir + "/config.yaml")

Values marked INFERRED in ``../shared/reference/paper.md`` (not published by the SimFlow paper)
are options here, with the documented default named in their help text.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and how to fix it."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a description (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: Literal["digits", "fashion_mnist", "imagefolder"] = option(
        "fashion_mnist", "Dataset: `digits` (scikit-learn, for tests), `fashion_mnist` (the demo; "
        "Debian's dataset-fashion-mnist or data.root), `imagefolder` (ImageNet: root/train, root/val).")
    root: str | None = option(None, "Dataset folder. None: the dataset's default locations.")
    image_size: int = option(32, "Training resolution in pixels (ImageNet: ADM centre crop).")
    hflip: bool = option(False, "Random horizontal flips in training.")
    num_workers: int = option(0, "DataLoader worker processes per rank.")


@dataclass
class VAEConfig:
    latent_channels: int = option(4, "Latent channels d (paper: 64, the f16d64 VAE, INFERRED).")
    base_channels: int = option(32, "Channels of the first encoder level (REPA-E f16: 128).")
    channel_mult: list[int] = option([1, 2, 2], "Channel multiplier per level; the downsampling "
                                     "factor is 2^(len − 1) (paper f16: [1, 1, 2, 2, 4], INFERRED).")
    num_res_blocks: int = option(1, "ResNet blocks per level (REPA-E: 2).")
    attn_resolutions: list[int] = option([], "Spatial sizes with self-attention (REPA-E: [16]).")
    posterior: Literal["fixed", "learnable", "layernorm"] = option(
        "fixed", "`fixed`: std ≡ fixed_std (SimFlow); `learnable`: predicted log-variance; "
        "`layernorm`: LayerNorm on the mean + predicted log-variance (the paper's LN, INFERRED).")
    fixed_std: float = option(0.5, "σ̄ of the fixed posterior (paper: 0.5, i.e. variance 0.25).")
    logvar_init: float = option(-6.9, "Initial log-variance of the learnable / layernorm posteriors "
                                "(the bias of its output): −6.9 is a variance of 1e-3, the small-variance "
                                "regime of standard VAEs (\"often < 0.01\", SimFlow arXiv 2512.04084, §1).")
    dropout: float = option(0.0, "Dropout inside ResNet blocks.")


@dataclass
class FlowConfig:
    patch_size: int = option(1, "Patch size p on the latent (or pixel) map (paper: 1, INFERRED).")
    channels: int = option(128, "Transformer width (paper: 1152).")
    layers_per_block: list[int] = option([2, 2, 4], "Depth of each flow block, data → noise; the "
                                         "last is the deep one (paper: [2, 2, 2, 2, 2, 46], INFERRED).")
    head_dim: int = option(32, "Attention head size (TarFlow/STARFlow: 64).")
    class_conditional: bool = option(True, "Condition on the class label (needed for CFG).")
    conditioning: Literal["adaln", "add"] = option(
        "adaln", "`adaln` (the paper's run name says adaln) or `add` (TarFlow's class embedding).")
    label_drop: float = option(0.1, "Label dropout for CFG training (TarFlow/STARFlow: 0.1).")
    scale_param: Literal["softplus", "exp"] = option(
        "softplus", "Affine scale parametrisation: STARFlow's softplus (default) or TarFlow's exp.")
    soft_clip: float = option(4.0, "tanh soft-clip of the raw scale output (STARFlow: 4); 0 = off.")


@dataclass
class ModelConfig:
    mode: Literal["end_to_end", "frozen_vae", "frozen_encoder", "pixel"] = option(
        "end_to_end", "`end_to_end`: VAE + flow jointly from scratch, no stop-gradient (SimFlow); "
        "`frozen_vae`: pretrained VAE frozen, flow on its latents; `frozen_encoder`: encoder frozen, "
        "decoder fine-tuned on noisy latents (STARFlow); `pixel`: TarFlow on image patches, no VAE.")
    pretrained_vae: str | None = option(None, "Checkpoint of `simflow pretrain-vae` (frozen modes).")
    decoder_scale: float | Literal["calibrated"] | None = option(
        "calibrated", "Rate weighting (the paper's weight is NOT PUBLISHED): the scale b of a Laplace "
        "decoder, in pixel units on the [−1, 1] scale, so that L1 + w·NLL is its ELBO with "
        "w = l1_weight·b·D_lat/D_pix on the per-dim NLL. `calibrated`: b = the batch's mean absolute "
        "reconstruction error, the maximum-likelihood scale (calibrated decoder, arXiv 2006.13202). "
        "null: use model.nll_weight. Applies in end_to_end mode; the flow NLL has weight 1 elsewhere.")
    nll_weight: float | None = option(None, "Raw weight w of the flow NLL (reduced per "
                                      "nll_reduction) when model.decoder_scale is null. w = 1 on the "
                                      "per-dim NLL equals b = D_pix/D_lat (4 in the demo): it collapses "
                                      "the encoder (README).")
    nll_reduction: Literal["per_dim", "per_sample"] = option(
        "per_dim", "With a raw nll_weight: `per_dim` (nats per latent dimension, TarFlow/STARFlow) or "
        "`per_sample` (nats per sample). Irrelevant with a decoder_scale.")
    include_entropy: bool = option(True, "Subtract the posterior entropy H(q) from the NLL (the "
                                   "ELBO term; a constant for the fixed posterior).")
    l1_weight: float = option(1.0, "L1 reconstruction weight (REPA-E: 1).")
    mse_weight: float = option(0.0, "MSE reconstruction weight.")
    lpips_weight: float = option(0.0, "LPIPS weight (REPA-E: 1); 0 loads nothing.")
    lpips_backbone_weights_path: str | None = option(None, "Local VGG weights for LPIPS (offline).")
    adv_weight: float = option(0.0, "PatchGAN hinge generator weight (REPA-E: 0.1); 0 = no GAN.")
    adv_start_step: int = option(0, "Step at which the adversarial loss starts.")
    disc_channels: int = option(32, "Discriminator base channels.")
    disc_layers: int = option(2, "Discriminator depth (PatchGAN n_layers; 3 at 256 px).")
    kl_weight: float = option(1e-6, "KL(q‖N(0,I)) weight (REPA-E: 1e-6, per-sample sum).")
    latent_noise_std: float = option(0.0, "Gaussian noise σ added to the flow's input: latent "
                                     "augmentation in frozen modes (STARFlow: 0.3), pixel noise in "
                                     "`pixel` mode (TarFlow ImageNet-64: 0.05).")
    noise_type: Literal["gaussian", "uniform"] = option(
        "gaussian", "Pixel mode: `gaussian` augmentation (generation) or `uniform` dequantisation "
        "(likelihood, TarFlow's bits/dim).")
    latent_source: Literal["sample", "mean"] = option(
        "sample", "Frozen modes: flow on posterior samples (STARFlow) or posterior means.")
    latent_scale: float | None = option(None, "Frozen modes: latents are multiplied by this; None "
                                        "= 1/std of the pretrained VAE's latents, measured once.")
    repa_weight: float = option(0.0, "REPA alignment weight (REPA-E: 0.5 model / 1.5 VAE); 0 = off.")
    repa_layer: int = option(3, "Flow transformer layer aligned by REPA, counted from the data "
                             "side from 0 (paper run name: repaAlign3; exact meaning NOT RETRIEVED).")
    repa_target: Literal["classifier", "dinov2_vitb14"] = option(
        "classifier", "REPA target encoder: the demo's frozen Fashion-MNIST classifier "
        "(`simflow feature-extractor`) or DINOv2-B (local weights).")
    repa_target_weights_path: str | None = option(None, "Checkpoint / hub dir of the REPA target.")
    repa_hidden: int = option(2048, "Hidden width of the REPA projector MLP (REPA: 2048).")

    def __post_init__(self) -> None:
        if self.decoder_scale is not None and self.nll_weight is not None:
            raise ConfigError("model.nll_weight and model.decoder_scale are both set; the decoder "
                              "scale defines the weight: set model.decoder_scale: null to use the "
                              "raw model.nll_weight")
        if self.decoder_scale is None and self.nll_weight is None:
            raise ConfigError("model.decoder_scale is null but model.nll_weight is not set: give one "
                              "(decoder_scale: calibrated is the default)")
        if isinstance(self.decoder_scale, float) and not self.decoder_scale > 0:
            raise ConfigError(f"model.decoder_scale: {self.decoder_scale} must be > 0 (or `calibrated`)")
        if self.decoder_scale is not None and self.mode == "end_to_end" and self.l1_weight <= 0:
            raise ConfigError("model.decoder_scale derives the NLL weight from the L1 term, but "
                              "model.l1_weight is 0: set model.decoder_scale: null and model.nll_weight")


@dataclass
class TrainConfig:
    steps: int = option(2000, "Optimisation steps.")
    global_batch_size: int = option(64, "Global batch (paper: 256 = 16 GPUs × 16, INFERRED); the "
                                    "per-rank batch and accumulation are derived from the world size.")
    micro_batch_size: int | None = option(None, "Largest per-rank forward batch; None = global / world.")
    lr: float = option(1e-3, "Flow learning rate (TarFlow/STARFlow: 1e-4 at scale).")
    vae_lr: float = option(1e-3, "VAE learning rate (REPA-E: 1e-4).")
    disc_lr: float = option(1e-3, "Discriminator learning rate (REPA-E: 1e-4).")
    betas: list[float] = option([0.9, 0.95], "AdamW betas (TarFlow: 0.9, 0.95).")
    weight_decay: float = option(1e-4, "AdamW weight decay on ≥2-D weights (TarFlow: 1e-4).")
    warmup_steps: int = option(100, "Linear warm-up steps.")
    min_lr_ratio: float = option(0.01, "Cosine decay floor as a fraction of the peak lr.")
    grad_clip: float = option(1.0, "Gradient-norm clip per optimiser (REPA-E: 1); 0 = off.")
    ema_decay: float = option(0.999, "EMA decay of flow and VAE (REPA-E: 0.9999); 0 = off.")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "`auto`: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = option(False, "torch.compile the training step's model forward.")
    seed: int = option(0, "Global seed (per-rank seed = seed·world + rank).")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (exact CPU resume).")
    log_every: int = option(20, "Steps between metric logs (the rate monitor too).")
    collapse_threshold: float = option(0.05, "Rate (nats per latent dim above the posterior-entropy "
                                       "floor) below which the encoder counts as collapsed; measured: "
                                       "0.02 collapsed, ≥ 0.3 healthy in the demo (README).")
    collapse_patience: int = option(3, "Consecutive log steps after warm-up below collapse_threshold "
                                    "that raise the collapse alarm (a warning and an MLflow tag).")
    fid_every: int = option(0, "Steps between gFID probes on train.fid_samples EMA samples (Figure 2 "
                            "of the paper: gFID during training); 0 = off. Needs eval.reference_stats.")
    fid_samples: int = option(200, "Samples per gFID probe (a small-sample FID: biased high, "
                              "comparable across steps and variants at equal count).")
    sample_every: int = option(0, "Steps between sample grids (0 = only at the end).")
    checkpoint_every: int = option(200, "Steps between checkpoints (latest.pt is replaced).")
    keep_every: int = option(0, "Also keep step_XXXXXXX.pt every N steps (0 = none).")
    resume: str = option("auto", "`auto` (latest checkpoint if any), `never`, or a checkpoint path.")
    max_steps_this_run: int | None = option(None, "Stop (checkpointed) after this many steps in "
                                            "this process; for tests of resume. None = no limit.")


@dataclass
class SampleConfig:
    num_samples: int = option(1000, "Samples to generate (paper protocol: 50 000).")
    batch_size: int = option(100, "Samples per forward batch (per rank).")
    labels: Literal["balanced", "uniform"] = option("balanced", "Class labels: equal counts, or uniform random.")
    guidance: float = option(0.0, "CFG scale w (0 = none). SimFlow's value: NOT RETRIEVED.")
    guidance_method: str = option("linear", "`linear` (TarFlow), `precision` (STARFlow); the "
                                  "paper's revised CFG is NOT RETRIEVED: register it in flow.py.")
    guide: Literal["shift", "scale", "both"] = option("both", "Linear guidance: what is extrapolated.")
    annealed: bool = option(False, "Anneal w over the token index (TarFlow's FID setting).")
    attn_temp: float | None = option(None, "Attention temperature τ of the unconditional branch "
                                     "(guidance of unconditional models); None = null class.")
    temperature: float = option(1.0, "Std of the prior noise.")
    denoise: bool = option(False, "Tweedie denoising x + s·σ²∇log p(x) with σ = latent_noise_std.")
    denoise_step_scale: float = option(1.0, "s of the denoising step (1 = theoretical optimum).")
    use_ema: bool = option(True, "Sample from the EMA weights.")
    seed: int = option(0, "Base seed; sample i's noise is seeded by (seed, i), independent of GPUs.")
    use_cache: bool = option(True, "KV-cached autoregressive inverse (False: reference, slow).")


@dataclass
class EvalConfig:
    feature_extractor: str = option("inception-v3-compat", "torch-fidelity extractor; the demo "
                                    "uses `simflow-classifier` (an honest proxy, not Inception).")
    feature_extractor_weights_path: str | None = option(None, "Local Inception weights (offline).")
    classifier_path: str | None = option(None, "Checkpoint of `simflow feature-extractor`.")
    reference_stats: str | None = option(None, "Reference statistics .npz (ours, or ADM's "
                                         "VIRTUAL_imagenet256_labeled.npz); None: computed by fid-ref.")
    num_reference: int = option(10000, "Images used for reference statistics (None-like: all).")
    isc: bool = option(True, "Inception score.")
    kid: bool = option(False, "KID (needs reference images).")
    prc: bool = option(False, "Precision/recall (needs reference images).")
    num_recon: int = option(1000, "Images for rFID / PSNR in `reconstruct`.")
    noise_levels: list[float] = option([0.0, 0.25, 0.5, 0.75, 1.0], "Latent-noise stds of "
                                       "Figure 3a (reconstruction under latent noise).")
    num_nll: int = option(1000, "Test images for `nll` (bits/dim).")
    num_latents: int = option(512, "Validation images encoded by `latents`.")
    classifier_steps: int = option(1500, "Training steps of the demo feature extractor.")


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
    backend: Literal["local", "submitit-local", "slurm"] = option(
        "local", "`local`: in-process; `submitit-local`: a submitit subprocess; `slurm`: sbatch via submitit.")
    partition: str | None = option(None, "SLURM partition.")
    account: str | None = option(None, "SLURM account.")
    qos: str | None = option(None, "SLURM QoS.")
    constraint: str | None = option(None, "SLURM constraint (e.g. a GPU type).")
    nodes: int = option(1, "Nodes per job (paper: 2).")
    gpus_per_node: int = option(1, "GPUs per node; one task per GPU (paper: 8).")
    tasks_per_node: int | None = option(None, "Tasks per node; None = gpus_per_node (1 on CPU).")
    cpus_per_task: int = option(8, "CPUs per task.")
    mem_gb: float | None = option(None, "Memory per node in GB (None: the cluster default).")
    timeout_min: int = option(60, "Job time limit; training requeues and resumes on timeout.")
    signal_delay_s: int = option(120, "Seconds before the limit at which SLURM signals the job.")
    max_num_timeout: int = option(20, "How often a timed-out job is requeued.")
    extra_sbatch: dict = option({}, "Other sbatch parameters, e.g. {mail-type: END}.")
    setup: list[str] = option([], "Shell lines run before the job (module load, conda activate).")
    log_dir: str = option("logs/submitit", "Folder of submitit's job logs (%j = job id).")


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
        raise ConfigError(f"unknown config key '{where}'; valid keys{' of ' + path if path else ''}: "
                          f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


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


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` → ``{"train": {"lr": 3e-4}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Read a YAML file (or a mapping), apply ``key.path=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if data:
        raw = deep_merge(raw, data)
    for text in overrides or []:
        raw = deep_merge(raw, parse_override(text))
    return from_dict(Config, raw)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


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
        props[f.name] = {**_json_type(tp), "default": default, "description": f.metadata.get("help", "")}
    return {"type": "object", "additionalProperties": False, "properties": props}


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
