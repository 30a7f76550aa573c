"""The stages of the study, one function each (:data:`STAGE_FUNCTIONS`).

A stage reads its resolved :class:`~simflow.config.Config`, does one job on one GPU job (or a CPU),
writes **final** files atomically at the end (their existence means the stage finished; the
workflow relies on it) and logs into its variant's MLflow run. Which files each stage writes is
listed in :data:`simflow.contracts.STAGE_FILES`.

:func:`simflow.runner.run_stage` loads a stage's config and runs its function here, or submits it
through the launcher (``launcher.backend``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from simflow.checkpoints import CheckpointError, atomic_save, check_resume_early, load_checkpoint
from simflow.classifier import train_feature_extractor
from simflow.config import Config, ConfigError, save_config, to_dict
from simflow.contracts import STAGE_FILES
from simflow.data import build_dataset, read_skipped_files, skipped_files_log, subset_indices
from simflow.distributed import DistEnv, barrier
from simflow.fid import (compute_metrics, compute_reference_statistics, images_to_uint8,
                         load_reference_features, register_classifier_extractor)
from simflow.flow import bits_per_dim
from simflow.io import make_grid, save_npz, save_samples_npz, write_json, write_png
from simflow.model import DEQUANTISED_LOG_SCALE, SimFlowModel, build_model, dequantise, psnr
from simflow.preflight import rehearse
from simflow.sampling import resolve_mode
from simflow.tracking import StageRun, flatten
from simflow.train import sample_grid, train
from simflow.weights import autocast, ema_weights


# ------------------------------------------------------------------------------------------
# Small utilities
# ------------------------------------------------------------------------------------------
def stage_file(cfg: Config, stage: str, output: str) -> Path:
    """The final file ``output`` of ``stage`` in this unit's folder (:data:`simflow.contracts.STAGE_FILES`,
    which the workflow's rules declare as their outputs)."""
    return Path(cfg.run_dir) / STAGE_FILES[stage][output]


class RunLogger:
    """Adapter from the training loop's logger protocol to an MLflow :class:`StageRun`."""

    def __init__(self, run: StageRun, run_dir: Path):
        self.run, self.run_dir = run, run_dir

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self.run.log_metrics(metrics, step)

    def log_image(self, image: np.ndarray, name: str) -> None:
        path = write_png(self.run_dir / name, image)
        self.run.log_artifact(path, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def set_tag(self, key: str, value: str) -> None:
        self.run.set_tags({key: value})


def make_fid_probe(cfg: Config, env: DistEnv) -> Callable[[SimFlowModel, dict], float] | None:
    """The training loop's gFID probe (Figure 2): ``train.fid_samples`` class-balanced samples from
    the EMA weights, drawn as the sample stage draws them (seeded per index, ``sample.*``
    guidance), scored against ``eval.reference_stats``; None when ``train.fid_every`` is 0."""
    if not cfg.train.fid_every:
        return None
    if not cfg.eval.reference_stats:
        raise ValueError("train.fid_every > 0 needs eval.reference_stats (run `simflow fid-ref` and "
                         "point it at reference_stats.npz), or set train.fid_every: 0")
    sampling_mode(cfg, env.device)  # before training: a mode this device cannot run fails now
    register_extractor(cfg)
    path = Path(cfg.run_dir) / "fid_probe_samples.npz"

    @torch.no_grad()
    def probe(model: SimFlowModel, ema_state: dict) -> float:
        images = []
        with ema_weights(model, ema_state):
            for sl in batched(cfg.train.fid_samples, cfg.sample.batch_size):
                noise, y = sample_noise_and_labels(cfg, model, range(sl.start, sl.stop))
                out = generate_images(cfg, model, noise.to(env.device), None if y is None else y.to(env.device))
                images.append(images_to_uint8(torch.nan_to_num(out.float())).cpu().numpy())
        save_samples_npz(path, np.concatenate(images))
        metrics = compute_metrics(path, cfg.eval.reference_stats, None, cfg.eval.feature_extractor,
                                  cfg.eval.feature_extractor_weights_path, isc=False, kid=False, prc=False,
                                  cuda=env.device.type == "cuda")
        path.unlink()
        return float(metrics["fid"])

    return probe


def stage_dataset(cfg: Config, split: str):
    """``split`` of the configured dataset for a stage, with ``data.on_bad_file`` (files skipped
    as unreadable are listed in the unit's :func:`simflow.data.skipped_files_log`)."""
    return build_dataset(cfg.data.name, cfg.data.root, split, cfg.data.image_size,
                         on_bad_file=cfg.data.on_bad_file, skip_log=skipped_files_log(cfg.run_dir, split))


def eval_images(cfg: Config, n: int, split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of ``n`` images of ``split`` (the same for every variant)."""
    dataset = stage_dataset(cfg, split)
    idx = subset_indices(len(dataset), n, seed)
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def load_trained(cfg: Config, device: torch.device) -> SimFlowModel:
    """The trained model of this variant (EMA weights when ``sample.use_ema``)."""
    path = stage_file(cfg, "train", "model")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `simflow train` for this variant first")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; delete it and rerun `simflow train` for this variant (it "
                              "resumes from its last checkpoint)") from err
    info = ckpt["data_info"]
    model = build_model(cfg, info["channels"], info["num_classes"])
    model.load_state_dict(ckpt["ema" if cfg.sample.use_ema else "model"])
    return model.to(device).eval()


def register_extractor(cfg: Config) -> None:
    if cfg.eval.feature_extractor == "simflow-classifier":
        if not cfg.eval.classifier_path:
            raise ValueError("eval.feature_extractor=simflow-classifier needs eval.classifier_path "
                             "(the classifier.pt of `simflow feature-extractor`)")
        register_classifier_extractor(cfg.eval.classifier_path)


def batched(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------
def stage_feature_extractor(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    if not env.is_main:
        return {}
    train_set = stage_dataset(cfg, "train")
    test_set = stage_dataset(cfg, "test")
    result = train_feature_extractor(train_set, stage_file(cfg, "feature-extractor", "classifier"),
                                     steps=cfg.eval.classifier_steps, batch_size=64, seed=cfg.train.seed,
                                     eval_dataset=test_set,
                                     width=16, device=env.device, num_workers=cfg.data.num_workers)
    run.log_metrics({"feature_extractor/accuracy": result["accuracy"]})
    write_json(stage_file(cfg, "feature-extractor", "report"), result)
    return result


def stage_fid_ref(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    if not env.is_main:
        return {}
    register_extractor(cfg)
    dataset = stage_dataset(cfg, "train")
    subset = Subset(dataset, subset_indices(len(dataset), cfg.eval.num_reference, 0).tolist())
    out = compute_reference_statistics(subset, stage_file(cfg, "fid-ref", "stats"),
                                       cfg.eval.feature_extractor, cfg.eval.feature_extractor_weights_path,
                                       cuda=env.device.type == "cuda")
    return {"reference_stats": str(out), "num_images": len(subset)}


def require_reference(cfg: Config) -> None:
    """The reference statistics that generated (or real test) images are scored against, and
    their feature extractor registered with torch-fidelity."""
    if not cfg.eval.reference_stats:
        raise ValueError("eval.reference_stats is not set: run `simflow fid-ref` and point it at the "
                         "reference_stats.npz (or at ADM's VIRTUAL_imagenet256_labeled.npz)")
    register_extractor(cfg)


def stage_fid_floor(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    """The real-vs-real floor: ``sample.num_samples`` real **test** images (as many as a variant's
    generated samples, a fixed subset) scored like samples against the reference (train-set)
    statistics: FID's small-sample bias at the study's count, and KID's (near 0: unbiased)."""
    if not env.is_main:
        return {}
    require_reference(cfg)
    test_set = stage_dataset(cfg, "test")
    n = cfg.sample.num_samples
    if n > len(test_set):
        raise ValueError(f"the real-vs-real floor needs sample.num_samples = {n} test images, but "
                         f"{cfg.data.name}'s test split has {len(test_set)}; lower sample.num_samples")
    real = Subset(test_set, subset_indices(len(test_set), n, 0).tolist())
    metrics = compute_metrics(real, cfg.eval.reference_stats, None, cfg.eval.feature_extractor,
                              cfg.eval.feature_extractor_weights_path, isc=False, kid=cfg.eval.kid, prc=False,
                              cuda=env.device.type == "cuda")
    metrics = {**metrics, "num_images": metrics.pop("num_samples"), "split": "test"}
    run.log_metrics({f"floor/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_json(stage_file(cfg, "fid-floor", "metrics"), metrics)
    return metrics


def _finish_training(cfg: Config, env: DistEnv, run: StageRun, vae_only: bool) -> dict:
    run_dir = Path(cfg.run_dir)
    check_resume_early(cfg)  # a resume of another configuration fails before anything is written
    if env.is_main:
        # The resolved config (defaults filled in) beside the outputs; not config.yaml, which is
        # the workflow's input file of this unit.
        resolved = save_config(cfg, run_dir / "config.resolved.yaml")
        try:
            # not the preflight section: rehearsal settings, never part of the real run
            run.log_params_once(flatten({k: v for k, v in to_dict(cfg).items() if k != "preflight"}))
        except ValueError as err:  # a changed config re-run into the same MLflow run
            warnings.warn(f"MLflow params not updated: {err}", stacklevel=1)
        run.log_artifact(resolved, "config")
    probe = None if vae_only else make_fid_probe(cfg, env)
    result = train(cfg, env, RunLogger(run, run_dir) if env.is_main else None, vae_only=vae_only,
                   fid_probe=probe)
    summary = result.summary
    if not env.is_main:
        return summary
    # data.on_bad_file=skip: the files this run (and the runs it resumed) left out, all ranks'
    skipped = read_skipped_files(skipped_files_log(run_dir, "train"))
    summary["skipped_files"] = len(skipped)
    if skipped:
        print(f"data.on_bad_file=skip: {len(skipped)} unreadable training file(s) left out (listed in "
              f"{skipped_files_log(run_dir, 'train')})", flush=True)
    run.log_metrics({"data/skipped_files": len(skipped)}, summary["steps"])
    if not summary["finished"]:
        print(f"stopped at step {summary['steps']} of {cfg.train.steps} (train.max_steps_this_run); "
              "the same command resumes from the checkpoint", flush=True)
        return summary
    dataset_info = summary["data_info"]  # what load_trained needs to rebuild the model
    if vae_only:
        vae_state = {k[len("vae."):]: v for k, v in result.ema_state.items() if k.startswith("vae.")}
        atomic_save({"vae": vae_state, "config": to_dict(cfg), "data_info": dataset_info},
                    stage_file(cfg, "pretrain-vae", "vae"))
    else:
        atomic_save({"ema": result.ema_state, "model": result.model.state_dict(), "config": to_dict(cfg),
                     "data_info": dataset_info, "summary": summary}, stage_file(cfg, "train", "model"))
        RunLogger(run, run_dir).log_image(sample_grid(result.model, result.ema_state), "samples/final.png")
    run.log_metrics({"train/train_time_s": summary["train_time_s"], "train/img_per_s_mean": summary["img_per_s"]},
                    summary["steps"])
    write_json(stage_file(cfg, "pretrain-vae" if vae_only else "train", "summary"), summary)
    return summary


def stage_pretrain_vae(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    return _finish_training(cfg, env, run, vae_only=True)


def stage_train(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    return _finish_training(cfg, env, run, vae_only=False)


def sample_noise_and_labels(cfg: Config, model: SimFlowModel, indices: range) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise and label of every global sample index, each drawn from its own seeded generator, so
    the samples do not depend on how many processes or jobs produced them."""
    shape = model.flow_input_shape
    noise, labels = [], []
    k = model.flow.num_classes
    for i in indices:
        gen = torch.Generator().manual_seed(cfg.sample.seed * 1_000_003 + i)
        noise.append(torch.randn(shape, generator=gen) * cfg.sample.temperature)
        if k:
            labels.append(i % k if cfg.sample.labels == "balanced" else int(torch.randint(k, (1,), generator=gen)))
    return torch.stack(noise), (torch.tensor(labels) if k else None)


def rank_slice(n: int, env: DistEnv) -> range:
    """Contiguous share of the global indices 0..n-1 for this rank."""
    per = math.ceil(n / env.world_size)
    return range(env.rank * per, min(n, (env.rank + 1) * per))


def sampling_mode(cfg: Config, device: torch.device) -> str:
    """The sampler mode ``sample.mode`` resolves to on ``device`` (see
    :func:`simflow.sampling.resolve_mode`); a CUDA-only mode on a CPU run is a :class:`ConfigError`
    raised when the stage starts, not a silent fallback."""
    try:
        return resolve_mode(cfg.sample.mode, device)
    except ValueError as err:
        raise ConfigError(f"sample.mode={cfg.sample.mode}: {err}") from None


def generate_images(cfg: Config, model: SimFlowModel, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Images in [-1, 1] from prior noise, with the sampler mode, guidance and denoising of
    ``cfg.sample``."""
    s = cfg.sample
    guidance = None if s.guidance == 0 else s.guidance
    options: dict[str, Any] = {"mode": sampling_mode(cfg, noise.device)}
    if options["mode"] == "jacobi":
        options.update(jacobi_block_size=s.jacobi_block_size, jacobi_tol=s.jacobi_tol)
    if guidance is not None:
        options.update(guidance_method=s.guidance_method, attn_temp=s.attn_temp)
        if s.guidance_method == "linear":
            options.update(guide=s.guide, annealed=s.annealed)
        elif s.guidance_method == "precision":
            options.update(annealed=s.annealed)
    with autocast(cfg, noise.device):
        return model.generate(noise, labels, guidance=guidance, denoise=s.denoise,
                              denoise_step_scale=s.denoise_step_scale, **options)


def stage_sample(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    run_dir = Path(cfg.run_dir)
    sampling_mode(cfg, env.device)  # a mode this device cannot run fails before any work
    model = load_trained(cfg, env.device)
    s = cfg.sample
    mine = rank_slice(s.num_samples, env)
    images, labels = [], []
    for sl in batched(len(mine), s.batch_size):
        noise, y = sample_noise_and_labels(cfg, model, mine[sl])
        y = None if y is None else y.to(env.device)
        out = generate_images(cfg, model, noise.to(env.device), y)
        bad = ~torch.isfinite(out.float()).flatten(1).all(1)
        if bad.any():
            warnings.warn(f"{int(bad.sum())} non-finite samples in this batch (guidance too strong?)",
                          stacklevel=1)
        images.append(images_to_uint8(torch.nan_to_num(out.float())).cpu().numpy())
        labels.append(np.full(len(noise), -1) if y is None else y.cpu().numpy())
    shard = run_dir / f"samples.rank{env.rank}.npz"
    if images:
        save_npz(shard, images=np.concatenate(images), labels=np.concatenate(labels))
    else:  # more ranks than sample indices to share: this rank's share is empty
        save_npz(shard, images=np.zeros((0,), np.uint8), labels=np.zeros((0,), np.int64))
    barrier(env)
    if not env.is_main:
        return {}
    parts = [np.load(run_dir / f"samples.rank{r}.npz") for r in range(env.world_size)]
    parts = [p for p in parts if len(p["labels"])]
    all_images = np.concatenate([p["images"] for p in parts])
    all_labels = np.concatenate([p["labels"] for p in parts])
    for r in range(env.world_size):
        (run_dir / f"samples.rank{r}.npz").unlink()
    save_samples_npz(stage_file(cfg, "sample", "samples"), all_images, all_labels)
    grid = make_grid(all_images[:64], ncol=8)
    RunLogger(run, run_dir).log_image(grid, STAGE_FILES["sample"]["grid"])
    return {"num_samples": int(len(all_images))}


def stage_fid(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    if not env.is_main:
        return {}
    require_reference(cfg)
    reference_images = None
    # KID reads the per-image features that fid-ref stored with its statistics; the images are
    # extracted again only for precision/recall, or for a reference file without features.
    if cfg.eval.prc or (cfg.eval.kid and load_reference_features(cfg.eval.reference_stats) is None):
        dataset = stage_dataset(cfg, "train")
        reference_images = Subset(dataset, subset_indices(len(dataset), cfg.eval.num_reference, 0).tolist())
    metrics = compute_metrics(stage_file(cfg, "sample", "samples"), cfg.eval.reference_stats, reference_images,
                              cfg.eval.feature_extractor, cfg.eval.feature_extractor_weights_path,
                              isc=cfg.eval.isc, kid=cfg.eval.kid, prc=cfg.eval.prc,
                              cuda=env.device.type == "cuda")
    run.log_metrics({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_json(stage_file(cfg, "fid", "metrics"), metrics)
    return metrics


@torch.no_grad()
def stage_guidance(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    """The CFG sweep (TarFlow's guided-samples figure): for each weight of ``eval.guidance_weights``,
    ``sample.num_samples`` samples of the one trained model, drawn as `sample` draws them (the same
    seeded noise and labels at every weight; the other ``sample.*`` keys as set), and their gFID at
    that equal count. Keeps the first two samples of each class per weight for the figure. One
    process: the sweep is a few small sample sets."""
    if not env.is_main:
        return {}
    weights = list(cfg.eval.guidance_weights)
    if not weights:
        raise ConfigError("eval.guidance_weights is empty: give the CFG weights of the sweep, e.g. "
                          "[0, 0.5, 1, 2, 3]")
    if not cfg.eval.reference_stats:
        raise ConfigError("eval.reference_stats is not set: the guidance sweep scores gFID against it "
                          "(run `simflow fid-ref`)")
    sampling_mode(cfg, env.device)
    register_extractor(cfg)
    model = load_trained(cfg, env.device)
    if not model.flow.num_classes and cfg.sample.attn_temp is None:
        raise ConfigError("an unconditional flow has no null class to guide against: set "
                          "sample.attn_temp (TarFlow's attention-temperature guidance)")
    keep = 2 * max(model.flow.num_classes, 1)
    tmp = Path(cfg.run_dir) / "guidance_tmp_samples.npz"
    rows, kept = [], []
    for k, weight in enumerate(weights):
        wcfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance=float(weight)))
        images, non_finite = [], 0
        for sl in batched(cfg.sample.num_samples, cfg.sample.batch_size):
            noise, y = sample_noise_and_labels(wcfg, model, range(sl.start, sl.stop))
            out = generate_images(wcfg, model, noise.to(env.device), None if y is None else y.to(env.device))
            non_finite += int((~torch.isfinite(out.float()).flatten(1).all(1)).sum())
            images.append(images_to_uint8(torch.nan_to_num(out.float())).cpu().numpy())
        all_images = np.concatenate(images)
        save_samples_npz(tmp, all_images)
        fid = compute_metrics(tmp, cfg.eval.reference_stats, None, cfg.eval.feature_extractor,
                              cfg.eval.feature_extractor_weights_path, isc=False, kid=False, prc=False,
                              cuda=env.device.type == "cuda")["fid"]
        tmp.unlink()
        rows.append({"guidance": float(weight), "fid": float(fid), "non_finite": non_finite})
        kept.append(all_images[:keep])
        run.log_metrics({"eval/guidance_fid": float(fid), "eval/guidance_weight": float(weight)}, step=k)
        print(f"guidance {weight:g}: gFID {fid:.2f} ({non_finite} non-finite samples)", flush=True)
    save_npz(stage_file(cfg, "guidance", "samples"), images=np.stack(kept),
             weights=np.asarray(weights, dtype=np.float64))
    result = {"sweep": rows, "num_samples": cfg.sample.num_samples,
              "guidance_method": cfg.sample.guidance_method, "guide": cfg.sample.guide,
              "annealed": cfg.sample.annealed, "denoise": cfg.sample.denoise,
              "feature_extractor": cfg.eval.feature_extractor}
    write_json(stage_file(cfg, "guidance", "metrics"), result)
    return result


@torch.no_grad()
def stage_reconstruct(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    run_dir = Path(cfg.run_dir)
    if not env.is_main:
        return {}
    model = load_trained(cfg, env.device)
    out_json = stage_file(cfg, "reconstruct", "metrics")
    if model.vae is None:
        save_npz(stage_file(cfg, "reconstruct", "interpolation"), arr_0=np.zeros((0, 1, 1, 1), np.uint8),
                 not_applicable=True)
        result = {"rfid": None, "psnr": None, "noise_sweep": [], "not_applicable": "pixel-space model (no VAE)"}
        write_json(out_json, result)
        return result
    images, labels = eval_images(cfg, cfg.eval.num_recon)
    vae = model.vae
    recon, means = [], []
    for sl in batched(len(images), 128):
        mean = vae.encode(images[sl].to(env.device)).mode()
        means.append(mean)
        recon.append(vae.decode(mean).clamp(-1, 1).cpu())
    recon_t, mean_t = torch.cat(recon), torch.cat(means)
    result: dict[str, Any] = {"psnr": float(psnr(recon_t, images)), "mse": float((recon_t - images).pow(2).mean())}
    if cfg.eval.reference_stats:
        register_extractor(cfg)
        npz = save_samples_npz(run_dir / "reconstructions.npz", images_to_uint8(recon_t).numpy())
        fid = compute_metrics(npz, cfg.eval.reference_stats, None, cfg.eval.feature_extractor,
                              cfg.eval.feature_extractor_weights_path, isc=False, kid=False, prc=False,
                              cuda=env.device.type == "cuda")
        result["rfid"] = fid["fid"]
    else:
        result["rfid"] = None
    gen = torch.Generator().manual_seed(0)
    # The latent's own scale (std of the posterior means over images and dims), so Figure 3a can
    # show noise relative to it: a decoder that ignores a tiny latent must not look robust.
    latent_std = float(mean_t.float().std())
    result["latent_std"] = latent_std
    sweep = []
    for std in cfg.eval.noise_levels:
        noisy = []
        for sl in batched(len(mean_t), 128):
            eps = torch.randn(mean_t[sl].shape, generator=gen).to(env.device)
            noisy.append(vae.decode(mean_t[sl] + std * eps).clamp(-1, 1).cpu())
        noisy_t = torch.cat(noisy)
        sweep.append({"noise_std": std, "noise_rel": std / max(latent_std, 1e-12),
                      "psnr": float(psnr(noisy_t, images)),
                      "mse": float((noisy_t - images).pow(2).mean())})
    result["noise_sweep"] = sweep
    result["posterior"] = cfg.vae.posterior if model.mode == "end_to_end" else f"pretrained {cfg.vae.posterior}"
    # Figure 3b: decoded linear interpolation between two images of different classes.
    a = 0
    b = int(torch.nonzero(labels != labels[a])[0]) if (labels != labels[a]).any() else min(1, len(labels) - 1)
    ts = torch.linspace(0, 1, 8, device=mean_t.device)
    path = torch.stack([(1 - t) * mean_t[a] + t * mean_t[b] for t in ts])
    save_npz(stage_file(cfg, "reconstruct", "interpolation"),
             arr_0=images_to_uint8(vae.decode(path).clamp(-1, 1)).cpu().numpy())
    run.log_metrics({"eval/rfid": result["rfid"] if result["rfid"] is not None else float("nan"),
                     "eval/recon_psnr": result["psnr"]})
    for k, row in enumerate(sweep):
        run.log_metrics({"eval/noise_sweep_psnr": row["psnr"]}, step=k)
    write_json(out_json, result)
    return result


def nll_protocol(cfg: Config) -> tuple[str, str]:
    """(protocol key, what it means) of this variant's bits/dim: TarFlow's protocol only for a
    pixel model trained on what it is scored on, uniformly dequantised pixels."""
    if cfg.model.mode != "pixel":
        return "latent_posterior_samples", ("bits per latent dimension of posterior samples (not "
                                            "comparable to pixel bits/dim)")
    if cfg.model.noise_type == "uniform":
        return "tarflow_uniform_dequantisation", ("TarFlow's protocol (evaluate_bpd.py): a model "
                                                  "trained on uniformly dequantised pixels, scored on them")
    return "uniform_dequantisation_bound", (
        f"a model trained on Gaussian-noised pixels (σ={cfg.model.latent_noise_std:g}) scored on uniformly "
        "dequantised pixels: a valid upper bound on its 8-bit NLL, looser than TarFlow's protocol")


def bayes_predictions(model: SimFlowModel, images: Tensor, device: torch.device) -> Tensor:
    """Bayes' rule with the flow's conditional densities and a uniform class prior (the test sets
    are balanced): argmin over classes c of −log p(x | c), as TarFlow's MNIST notebook classifies.

    x is the clean image for a pixel flow (the notebook scores clean pixels with its noise-trained
    model) and the posterior mean for a latent flow: the latent analogue of the clean image (the
    flow models the mean plus posterior or augmentation noise), and deterministic, so the accuracy
    carries no posterior-sampling noise."""
    preds = []
    for sl in batched(len(images), 128):
        x, _ = model.encode_latents(images[sl].to(device), sample=False)
        preds.append(model.flow.class_nll(x.float()).argmin(1).cpu())
    return torch.cat(preds)


@torch.no_grad()
def stage_nll(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    if not env.is_main:
        return {}
    model = load_trained(cfg, env.device)
    images, labels = eval_images(cfg, cfg.eval.num_nll)
    y_all = labels if model.flow.num_classes else None
    nlls, marginals = [], []
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)  # the posterior noise / dequantisation noise of this evaluation
    for sl in batched(len(images), 128):
        x = images[sl].to(env.device)
        if model.vae is None:
            x = dequantise(x)  # TarFlow's evaluate_bpd.py: one draw of U[0, 1) per pixel
        else:
            _, x = model.encode_latents(x, sample=True)
        if y_all is None:
            nlls.append(model.flow.nll(x.float()).cpu())
            continue
        # −log p(x | c) for every class: the true label's, and the label-free density
        # p(x) = (1/K) Σ_c p(x | c) (uniform prior), comparable with an unconditional model's
        by_class = model.flow.class_nll(x.float()).cpu()
        nlls.append(by_class.gather(1, y_all[sl][:, None]).squeeze(1))
        marginals.append(math.log(by_class.shape[1]) - torch.logsumexp(-by_class, dim=1))
    torch.set_rng_state(gen_state)
    nll = torch.cat(nlls)
    d = model.flow.num_dims
    correction = DEQUANTISED_LOG_SCALE if model.vae is None else 0.0
    protocol, protocol_text = nll_protocol(cfg)
    result: dict[str, Any] = {
        "nll_bpd": float(bits_per_dim(nll, d, correction).mean()),
        "nll_nats_per_dim": float(nll.mean() / d),
        "density": "p(x | y), the test label y" if y_all is not None else "p(x)",
        # bits/dim of p(x): the label-free density (an unconditional flow's nll_bpd)
        "nll_bpd_marginal": float(bits_per_dim(torch.cat(marginals) if marginals else nll, d,
                                               correction).mean()),
        "space": "pixels (uniform dequantisation, 8-bit bits/dim)" if model.vae is None
        else "latents (bits per latent dimension; not comparable to pixel bits/dim)",
        "protocol": protocol, "protocol_description": protocol_text,
        "trained_with": (f"{cfg.model.noise_type} noise σ={cfg.model.latent_noise_std:g}"
                         if model.vae is None and cfg.model.noise_type == "gaussian" else
                         "uniform dequantisation" if model.vae is None else "posterior samples"),
        "num_images": len(images)}
    metrics = {"eval/nll_bpd": result["nll_bpd"]}
    if model.flow.num_classes and cfg.eval.num_classify:
        test_images, test_labels = eval_images(cfg, cfg.eval.num_classify)
        correct = bayes_predictions(model, test_images, env.device) == test_labels
        result["bayes_accuracy"] = float(correct.float().mean())
        result["bayes_num_images"] = len(test_labels)
        result["bayes_input"] = "clean pixels" if model.vae is None else "posterior mean"
        metrics["eval/bayes_accuracy"] = result["bayes_accuracy"]
    else:
        result["bayes_accuracy"] = None  # an unconditional flow has no p(x | y); or eval.num_classify: 0
    run.log_metrics(metrics)
    write_json(stage_file(cfg, "nll", "metrics"), result)
    return result


@torch.no_grad()
def stage_latents(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    if not env.is_main:
        return {}
    model = load_trained(cfg, env.device)
    out = stage_file(cfg, "latents", "latents")
    if model.vae is None:
        save_npz(out, not_applicable=True)
        return {"not_applicable": True}
    images, labels = eval_images(cfg, cfg.eval.num_latents, split="test", seed=1)
    mus, zs = [], []
    torch.manual_seed(0)
    for sl in batched(len(images), 128):
        mu, z = model.encode_latents(images[sl].to(env.device), sample=True)
        mus.append(mu.cpu().numpy())
        zs.append(z.cpu().numpy())
    save_npz(out, mu=np.concatenate(mus), z=np.concatenate(zs), labels=labels.numpy())
    return {"num_latents": len(images)}


def stage_preflight(cfg: Config, env: DistEnv, run: StageRun) -> dict:
    """A short rehearsal of this unit's training stage (see :mod:`simflow.preflight`)."""
    return rehearse(cfg, env, run)


#: The function of each stage of :data:`simflow.contracts.STAGES`, called as ``fn(cfg, env, run)``.
STAGE_FUNCTIONS: dict[str, Callable[[Config, DistEnv, StageRun], dict]] = {
    "preflight": stage_preflight,
    "feature-extractor": stage_feature_extractor,
    "fid-ref": stage_fid_ref,
    "fid-floor": stage_fid_floor,
    "pretrain-vae": stage_pretrain_vae,
    "train": stage_train,
    "sample": stage_sample,
    "fid": stage_fid,
    "guidance": stage_guidance,
    "reconstruct": stage_reconstruct,
    "nll": stage_nll,
    "latents": stage_latents,
}
