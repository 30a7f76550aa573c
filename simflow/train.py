"""The training loop shared by ``pretrain-vae`` and ``train``.

Habits (nanoGPT / DiT / MAE): one checkpoint dict, written atomically; the data order is a pure
function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would;
EMA from step 0; bf16 autocast on CUDA without a GradScaler; every rank-dependent decision is made
on the **global** rank.

Gradient synchronisation: the model has up to three optimisers (flow, VAE, discriminator), frozen
parts, and a generator pass in which the discriminator must not learn. Rather than wrapping it in
``DistributedDataParallel`` (whose unused-parameter bookkeeping fights all three), gradients are
averaged explicitly with one flat all-reduce per optimiser after the backward passes.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from simflow.checkpoints import (LATEST, CheckpointKeeper, NonFiniteLossError, atomic_save,
                                 check_resume_config, checkpoint_dir, load_checkpoint,
                                 load_resume_checkpoint, non_finite_message)
from simflow.config import Config, to_dict
from simflow.contracts import FROZEN_MODES
from simflow.data import build_dataset, skipped_files_log
from simflow.distributed import DistEnv, all_reduce_mean_, mean_over_ranks
from simflow.fid import images_to_uint8
from simflow.flops import counted_step_flops
from simflow.io import make_grid
from simflow.model import QUANTISATION_STEP, SimFlowModel, build_model
from simflow.rate import RATE_KEYS, CollapseMonitor, collapse_reasons
from simflow.weights import EMA, autocast, ema_weights


# ------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------
class StepBatches:
    """Global batch of step s = slice of epoch e's permutation, seeded by (seed, e).

    The global batch is split contiguously by global rank, so the union over ranks is the same
    global batch whatever the world size. Stateless: resuming at step s needs nothing but s.
    """

    def __init__(self, dataset_len: int, global_batch: int, seed: int):
        if global_batch > dataset_len:
            raise ValueError(f"train.global_batch_size {global_batch} exceeds the dataset size {dataset_len}")
        self.n = dataset_len
        self.global_batch = global_batch
        self.seed = seed
        self.per_epoch = dataset_len // global_batch  # drop the ragged tail of each epoch
        self._cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=gen))
        return self._cache[1]

    def indices(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        batch = self._permutation(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        per_rank = self.global_batch // world_size
        return batch[rank * per_rank:(rank + 1) * per_rank]


def collate_items(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label) items → images (B, C, H, W) and int64 labels (B,)."""
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def collate(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return collate_items([dataset[int(i)] for i in indices])


class StepBatchSampler(torch.utils.data.Sampler):
    """This rank's indices of the steps ``start … stop−1`` of :class:`StepBatches`, one list per
    step, so a DataLoader yields exactly the batches the step-indexed order prescribes."""

    def __init__(self, batches: StepBatches, start: int, stop: int, rank: int, world_size: int):
        self.batches, self.start, self.stop = batches, start, stop
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batches.indices(step, self.rank, self.world_size).tolist()

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def make_train_loader(cfg: Config, dataset, batches: StepBatches, start_step: int, rank: int,
                      world_size: int) -> torch.utils.data.DataLoader:
    """The training batches of steps ``start_step … train.steps−1`` for this rank, loaded by
    ``data.num_workers`` worker processes (0: in this process).

    The loader draws its workers' base seed from its own generator, seeded by (train.seed, rank,
    start step), never from the global RNG: creating it leaves the training stream (noise, label
    dropout) untouched, so resuming stays exact. With 0 workers the random flips
    (``data.hflip``) come from the training stream as well; with workers they come from the
    workers' seeds, so a resumed run flips differently from an uninterrupted one."""
    gen = torch.Generator().manual_seed((cfg.train.seed * world_size + rank) * 1_000_003 + start_step)
    sampler = StepBatchSampler(batches, start_step, cfg.train.steps, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_items,
                                       num_workers=cfg.data.num_workers, generator=gen)


# ------------------------------------------------------------------------------------------
# Optimisation pieces
# ------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], lr: float, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on ≥2-D weights only (nanoGPT), fused on CUDA."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.train.betas),
                             fused=device.type == "cuda")


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------
class TrainLogger(Protocol):
    """Where rank 0 sends metrics and images (an MLflow StageRun in the stages)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...
    def log_image(self, image: np.ndarray, name: str) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...


#: Images whose latents set the frozen modes' latent scale (1/std), measured once at the start.
LATENT_SCALE_IMAGES = 1024

#: gFID probe of the training loop (Figure 2): (model, EMA state) → FID of a small sample set.
FidProbe = Callable[[SimFlowModel, dict], float]

class DecoderScale:
    """The calibrated decoder scale b of ``model.decoder_scale: calibrated`` (end-to-end mode).

    b of step t is the mean absolute reconstruction error of step t−1 over its whole global batch
    (every rank and micro-batch), floored at :data:`simflow.model.QUANTISATION_STEP`: every rank
    and micro-batch of a step weighs the rate alike, so 1 or 16 GPUs (and any accumulation)
    optimise the same objective. A fresh run starts from the error of step 0's posterior-mean
    reconstructions (one gradient-free pass, no random numbers drawn). ``value`` is None for
    every other setting of ``model.decoder_scale``.
    """

    def __init__(self, model: SimFlowModel, vae_only: bool, value: float | None = None):
        self.enabled = (model.mode == "end_to_end" and model.cfg.decoder_scale == "calibrated"
                        and not vae_only)
        self.value = value if self.enabled else None

    @torch.no_grad()
    def start(self, model: SimFlowModel, images: torch.Tensor, micro: int, env: DistEnv) -> None:
        """Set the first estimate from this rank's share of step 0's batch, if none is set."""
        if not self.enabled or self.value is not None:
            return
        errors = [(model.vae.decode(model.vae.encode(chunk).mode()) - chunk).abs().float().mean()
                  for chunk in images.split(micro)]
        self.observe(torch.stack(errors).mean(), env)

    def observe(self, recon_mae: torch.Tensor, env: DistEnv) -> None:
        """Take this step's mean absolute error on this rank (a 0-d tensor, the mean over its
        equal-sized micro-batches) as the next step's b, averaged over the ranks."""
        if not self.enabled:
            return
        error = recon_mae.detach().float().reshape(1).clone()
        all_reduce_mean_([error], env)
        self.value = max(float(error), QUANTISATION_STEP)


@dataclass
class TrainResult:
    model: SimFlowModel
    ema_state: dict
    summary: dict


def accumulate_gradients(model: SimFlowModel, images: torch.Tensor, labels: torch.Tensor, step: int,
                         cfg: Config, micro: int, decoder_scale: float | None = None
                         ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Forward (under :func:`autocast`) and backward of this rank's batch in micro-batches of
    ``micro``, gradients accumulated as the mean over them. ``decoder_scale``: this step's
    calibrated b (:class:`DecoderScale`), the same for every micro-batch. Returns the loss terms
    (means over the micro-batches) and the detached reconstructions (for the discriminator step)."""
    device = images.device
    accumulation = len(images) // micro
    recon_chunks = []
    terms: dict[str, torch.Tensor] = {}
    for chunk in range(accumulation):
        sl = slice(chunk * micro, (chunk + 1) * micro)
        with autocast(cfg, device):
            out = model.training_losses(images[sl], labels[sl], step, decoder_scale)
        (out.total / accumulation).backward()
        for k, v in out.terms.items():
            terms[k] = terms.get(k, 0.0) + v.float() / accumulation
        if out.recon is not None:
            recon_chunks.append(out.recon)
    return terms, recon_chunks


def apply_gradients(optimizers: dict[str, torch.optim.Optimizer], cfg: Config, env: DistEnv,
                    units: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Average the gradients over ranks, clip them and step every optimiser but the
    discriminator's (stepped after its own loss). The clip is ``train.grad_clip`` times the
    optimiser's gradient unit (:meth:`SimFlowModel.gradient_units`; 1 where ``units`` does not
    name it). Returns the gradient norm per optimiser, in those units."""
    norms = {}
    for name, opt in optimizers.items():
        if name == "disc":
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        all_reduce_mean_([p.grad for p in params if p.grad is not None], env)
        unit = (units or {}).get(name, 1.0)
        norms[name] = (torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip * unit)
                       if cfg.train.grad_clip > 0 else grad_norm(params)) / unit
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def load_pretrained_vae(model: SimFlowModel, path: str | None) -> None:
    if model.mode not in FROZEN_MODES:
        return
    if not path:
        raise ValueError(f"model.mode={model.mode} needs model.pretrained_vae: the vae.pt written "
                         "by `simflow pretrain-vae`")
    if not Path(path).exists():
        raise FileNotFoundError(f"model.pretrained_vae={path} does not exist; run `simflow "
                                "pretrain-vae` first (the workflow does)")
    state = load_checkpoint(path)
    model.vae.load_state_dict(state["vae"])


def train(cfg: Config, env: DistEnv, logger: TrainLogger | None = None,
          vae_only: bool = False, fid_probe: FidProbe | None = None) -> TrainResult:
    """Run (or resume) training as configured; return the model, its EMA state and a summary.

    ``vae_only`` trains the autoencoder alone (the ``pretrain-vae`` stage): the flow is built but
    gets no optimiser and no loss term. ``logger`` is used on rank 0 only. ``fid_probe`` is called
    on rank 0 every ``train.fid_every`` steps; its time does not count as training time.
    """
    device = env.device
    t_cfg = cfg.train
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    world = env.world_size
    if t_cfg.global_batch_size % world:
        raise ValueError(f"train.global_batch_size={t_cfg.global_batch_size} is not divisible by "
                         f"the world size {world}; change the batch or the number of GPUs")
    per_rank = t_cfg.global_batch_size // world
    micro = min(per_rank, t_cfg.micro_batch_size or per_rank)
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} is not divisible by train.micro_batch_size={micro}")
    accumulation = per_rank // micro

    dataset = build_dataset(cfg.data.name, cfg.data.root, "train", cfg.data.image_size, hflip=cfg.data.hflip,
                            on_bad_file=cfg.data.on_bad_file, skip_log=skipped_files_log(cfg.run_dir, "train"))
    torch.manual_seed(t_cfg.seed)  # the same initial weights on every rank; per-rank streams below
    model = build_model(cfg, dataset.channels, dataset.num_classes, vae_only=vae_only).to(device)
    load_pretrained_vae(model, cfg.model.pretrained_vae)
    groups = model.parameter_groups()
    if vae_only:
        groups.pop("flow", None)
    lrs = {"flow": t_cfg.lr, "vae": t_cfg.vae_lr, "disc": t_cfg.disc_lr}
    optimizers = {name: make_optimizer(params, lrs[name], cfg, device) for name, params in groups.items()}
    batches = StepBatches(len(dataset), t_cfg.global_batch_size, t_cfg.seed)

    start_step = 0
    ckpt_path, ckpt, unreadable = load_resume_checkpoint(cfg, device)
    keeper = CheckpointKeeper(checkpoint_dir(cfg), ckpt, ckpt_path, unreadable)
    if env.is_main:
        keeper.clean_temporary_files()
    ema = None
    if ckpt_path is not None:
        check_resume_config(cfg, ckpt_path, ckpt, model)
        model.load_state_dict(ckpt["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        ema = EMA(model, t_cfg.ema_decay)
        ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
        start_step = ckpt["step"]
        monitor_state = ckpt.get("monitor", {})
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][env.rank])
        else:  # resumed on another world size: fresh, distinct per-rank streams
            seed_everything((t_cfg.seed * world + env.rank) * 1_000_003 + start_step)
        if env.is_main:
            print(f"resumed from {ckpt_path} at step {start_step}", flush=True)
    else:
        if model.mode in FROZEN_MODES:
            # the latent std from a fixed random subset, not one batch: a scale the flow keeps
            gen = torch.Generator().manual_seed(t_cfg.seed)
            subset = torch.randperm(len(dataset), generator=gen)[:LATENT_SCALE_IMAGES]
            model.calibrate_latent_scale([collate(dataset, chunk)[0].to(device) for chunk in subset.split(micro)])
        ema = EMA(model, t_cfg.ema_decay)
        seed_everything(t_cfg.seed * world + env.rank)  # per-rank streams for noise and dropout
        monitor_state = {}
    collapse = CollapseMonitor(t_cfg.collapse_threshold, t_cfg.collapse_min_active_fraction,
                               t_cfg.collapse_patience, t_cfg.warmup_steps, monitor_state)
    decoder_scale = DecoderScale(model, vae_only, monitor_state.get("decoder_scale"))
    image_dims = dataset.channels * cfg.data.image_size ** 2
    fid_curve: list[dict] = list(monitor_state.get("fid_curve", []))
    last_rate: dict[str, float] = dict(monitor_state.get("last_rate", {}))
    train_clock = monitor_state.get("train_time_s", 0.0)  # training time of earlier runs (no probes)
    step_flops: float | None = monitor_state.get("step_flops")  # counted FLOPs of one training step
    del ckpt  # the keeper holds what it needs; the tensors are in the model now

    saved_at: list[int] = []  # the steps checkpointed by this process

    def save_checkpoint(step: int) -> Path:
        saved_at.append(step)
        rngs = gather_rng(env)
        record = keeper.close_window(step)
        if env.is_main:
            monitor = {**collapse.state(), "decoder_scale": decoder_scale.value, "step_flops": step_flops,
                       "fid_curve": fid_curve,
                       "last_rate": last_rate, "train_time_s": train_clock + time.perf_counter() - t_start - probe_time}
            state = {"model": model.state_dict(), "ema": ema.state,
                     "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                     "step": step, "rng": rngs, "config": to_dict(cfg), "world_size": world,
                     "loss": record, "monitor": monitor}
            keeper.write(state)
            if t_cfg.keep_every and step % t_cfg.keep_every == 0:
                atomic_save(state, checkpoint_dir(cfg) / f"step_{step:07d}.pt")
        return checkpoint_dir(cfg) / LATEST

    if t_cfg.compile and not vae_only:
        # In place, after the EMA copy of the state dict: parameter names (checkpoints) unchanged.
        model.flow.compile_blocks()
    loader = iter(make_train_loader(cfg, dataset, batches, start_step, env.rank, world))
    model.train()
    step = start_step
    steps_this_run = 0
    images_seen, t_start, t_window = 0, time.perf_counter(), time.perf_counter()
    probe_time = 0.0  # seconds of gFID probes in this run, excluded from training time
    progress = make_progress(t_cfg.steps, start_step, env)
    terms_acc: dict[str, float] = {}
    loss_check: torch.Tensor | None = None  # the last step's loss (None: a resumed run that was already done)
    while step < t_cfg.steps:
        if t_cfg.max_steps_this_run is not None and steps_this_run >= t_cfg.max_steps_this_run:
            break
        factor = lr_factor(step, t_cfg.warmup_steps, t_cfg.steps, t_cfg.min_lr_ratio)
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = lrs[name] * factor
        images, labels = next(loader)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

        decoder_scale.start(model, images, micro, env)
        b = decoder_scale.value
        if step_flops is None:  # a fresh run: one training step's FLOPs, counted on the side
            with autocast(cfg, device):
                step_flops = counted_step_flops(model, images[:micro], labels[:micro], step, b) * accumulation * world
        terms_step, recon_chunks = accumulate_gradients(model, images, labels, step, cfg, micro, b)
        if b is not None:
            terms_step["decoder_scale"] = torch.tensor(b)
        loss_check = terms_step["total"].detach().clone().reshape(1)
        all_reduce_mean_([loss_check], env)
        if not torch.isfinite(loss_check).all():
            raise NonFiniteLossError(non_finite_message(float(loss_check), step, cfg, keeper))
        keeper.observe(float(loss_check))
        norms = apply_gradients(optimizers, cfg, env, model.gradient_units(b, image_dims))
        if "recon_mae" in terms_step:
            decoder_scale.observe(terms_step["recon_mae"], env)

        if "disc" in optimizers and recon_chunks:
            recon = torch.cat(recon_chunks)
            with autocast(cfg, device):
                d_loss = model.discriminator_loss(images, recon, step)
            if d_loss is not None:
                d_loss.backward()
                params = [p for g in optimizers["disc"].param_groups for p in g["params"]]
                all_reduce_mean_([p.grad for p in params if p.grad is not None], env)
                if t_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
                optimizers["disc"].step()
                terms_step["disc_loss"] = d_loss.detach().float()
            optimizers["disc"].zero_grad(set_to_none=True)

        ema.update(model, step)
        step += 1
        steps_this_run += 1
        images_seen += t_cfg.global_batch_size
        for k, v in terms_step.items():
            terms_acc[k] = terms_acc.get(k, 0.0) + float(v)
        progress.update(1)

        if step % t_cfg.log_every == 0 or step == t_cfg.steps:
            now = time.perf_counter()
            n = t_cfg.log_every if step % t_cfg.log_every == 0 else (step - start_step) % t_cfg.log_every or 1
            # Every rank gets here at the same steps: log the mean over ranks, i.e. the value of
            # the global batch (rank 0's own terms describe 1/world of it).
            metrics = {f"train/{k}": v / n for k, v in mean_over_ranks(terms_acc, env).items()}
            metrics.update({f"train/grad_norm_{k}": float(v) for k, v in norms.items()})
            metrics["train/lr"] = t_cfg.lr * factor
            metrics["train/img_per_s"] = n * t_cfg.global_batch_size / max(now - t_window, 1e-9)
            terms_acc, t_window = {}, now
            last_rate = {k: metrics[f"train/{k}"] for k in RATE_KEYS if f"train/{k}" in metrics}
            if collapse.update(step, last_rate) and env.is_main:
                print(f"WARNING: collapse alarm at step {step} of {cfg.variant}: for "
                      f"{t_cfg.collapse_patience} log steps {collapse.alarm_reason} "
                      f"(train.collapse_threshold={t_cfg.collapse_threshold}, "
                      f"train.collapse_min_active_fraction={t_cfg.collapse_min_active_fraction}); the "
                      "encoder carries little about the image. Lower the rate weight "
                      "(model.decoder_scale) or check the posterior.", flush=True)
                if logger:
                    logger.set_tag("simflow.collapse_alarm", f"step {step}: {collapse.alarm_reason}")
            if env.is_main:
                progress.set_postfix(loss=f"{metrics['train/total']:.4f}", img_s=f"{metrics['train/img_per_s']:.0f}")
                if not progress.enabled:
                    print(f"step {step}/{t_cfg.steps} loss {metrics['train/total']:.4f} "
                          f"img/s {metrics['train/img_per_s']:.1f}", flush=True)
                if logger:
                    logger.log_metrics(metrics, step)
        if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < t_cfg.steps:
            save_checkpoint(step)
        if logger and env.is_main and t_cfg.sample_every and step % t_cfg.sample_every == 0:
            logger.log_image(sample_grid(model, ema.state), f"samples/step_{step:07d}.png")
        if fid_probe is not None and env.is_main and t_cfg.fid_every and step % t_cfg.fid_every == 0:
            t_probe = time.perf_counter()
            clock = train_clock + (t_probe - t_start) - probe_time
            fid = fid_probe(model, ema.state)
            probe_time += time.perf_counter() - t_probe
            t_window += time.perf_counter() - t_probe  # img/s counts training only
            fid_curve.append({"step": step, "train_time_s": clock, "fid": fid})
            if logger:
                logger.log_metrics({"train/gfid_probe": fid}, step)
            model.train()
    progress.close()
    finished = step >= t_cfg.steps
    # Not twice (previous.pt must be an older state), and not when nothing ran: a requeued job of a
    # finished run (or one resumed with max_steps_this_run=0) leaves its checkpoints as they are.
    if step > start_step and (not saved_at or saved_at[-1] != step):
        save_checkpoint(step)  # also after max_steps_this_run, so a restart resumes exactly here
    elapsed = time.perf_counter() - t_start - probe_time
    # Collapsed: the alarm fired at some step, or the last log window meets a criterion (a run
    # too short for train.collapse_patience windows after warm-up is judged on its end).
    final_reasons = collapse_reasons(last_rate, t_cfg.collapse_threshold, t_cfg.collapse_min_active_fraction)
    collapsed = (collapse.alarm_step is not None or bool(final_reasons)) if "rate_per_dim" in last_rate else None
    if logger and env.is_main and collapsed is not None:
        logger.set_tag("simflow.collapsed", str(collapsed).lower())
    summary = {"steps": step, "finished": finished, "train_time_s": train_clock + elapsed,
               "rate": last_rate, "collapsed": collapsed, "collapse_alarm_step": collapse.alarm_step,
               "collapse_alarm_reason": collapse.alarm_reason,
               "collapse_final_reasons": final_reasons, "fid_curve": fid_curve,
               "img_per_s": images_seen / max(elapsed, 1e-9), "world_size": world,
               # forward + backward of the generator step (the discriminator's is not counted)
               "step_flops": step_flops, "train_flops": None if step_flops is None else step_flops * step,
               "global_batch_size": t_cfg.global_batch_size, "accumulation": accumulation,
               "final_loss": None if loss_check is None else float(loss_check),  # mean over ranks
               "num_params": {n: sum(p.numel() for p in ps) for n, ps in groups.items()},
               "data_info": {"channels": dataset.channels, "num_classes": dataset.num_classes}}
    return TrainResult(model, ema.state, summary)


def gather_rng(env: DistEnv) -> list[dict]:
    """Every rank's RNG state (rank order), so a resume restores each rank's own stream."""
    state = rng_state()
    if not env.enabled:
        return [state]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


class _NullProgress:
    enabled = False

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def make_progress(total: int, initial: int, env: DistEnv):
    """tqdm on a terminal (rank 0), plain log lines otherwise (SLURM logs stay small)."""
    if not env.is_main or not sys.stderr.isatty():
        return _NullProgress()
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    bar.enabled = True
    return bar


@torch.no_grad()
def sample_grid(model: SimFlowModel, ema_state: dict, n: int = 16) -> np.ndarray:
    """A fixed-noise grid from the EMA weights, uint8 (H·rows, W·cols, C), for MLflow."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((n, *model.flow_input_shape), generator=gen).to(device)
    labels = (torch.arange(n, device=device) % model.flow.num_classes) if model.flow.num_classes else None
    with ema_weights(model, ema_state):
        images = images_to_uint8(model.generate(noise, labels)).cpu().numpy()
    return make_grid(images)
