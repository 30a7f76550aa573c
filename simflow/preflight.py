"""The preflight: a short rehearsal of every training run of a study, before a cluster spends days on it.

``snakemake --profile slurm preflight`` (or ``snakemake -c2 --configfile config/demo.yaml
preflight``) runs the stage ``simflow preflight`` once per training unit: every variant (first
seed) and the shared pretrained VAE. Each is a job of the real stage's launcher (its partition,
account, constraint, CPUs, memory, setup lines) on one node with one GPU, and runs the real
training loop (:func:`simflow.train.train`) on the unit's real config for ``preflight.steps``
steps, into ``<unit>/preflight/`` (the real run's folder and checkpoints are never touched):

* **the configured per-GPU batch**: the real run's layout (``preflight.target_world_size``
  ranks, the world size of the real stage's launcher) gives a per-GPU batch and micro-batch; the
  rehearsal runs exactly that on each of its ranks (global batch = per-GPU batch × its own
  ranks), so its memory and its time per step per GPU are the real run's;
* **the schedule, compressed**: the real learning rates, warmed up over the first
  :data:`WARMUP_FRACTION` of the rehearsal (at most the real warm-up), then held at the peak (no
  decay), so the rehearsal reaches the rate the real run spends most of its steps at; the loss
  and the rate monitor are logged :data:`LOG_POINTS` times. The gFID probe, sample grids and
  intermediate checkpoints are off; the final checkpoint is written once (its size is the real
  run's) and deleted.

What each rehearsal reports (``<unit>/preflight/preflight.json``, one row of the report):
the loss of the first and last log window, the rate and the collapse verdict (the alarm of
``train.collapse_threshold`` / ``collapse_patience``, or a final rate below the threshold),
the step of a non-finite loss, peak memory (``torch.cuda.max_memory_allocated``, on CPU the
process's peak RSS), img/s in the steady state (log windows after the first), MFU of the flow on
a GPU (:func:`simflow.flops.train_flops`: flow FLOPs only, so a lower bound), the checkpoint's
size against the free disk, and the projected wall-clock and device-hours of the full run.

It also checks, on the node, what the real stages will read: the dataset's ``train`` split
(training) and ``test`` split (reconstruct, nll, latents) present and readable (every file of an
image folder decoded: unreadable ones are a red row naming them, amber with
``data.on_bad_file=skip``); the pretrained
VAE (frozen modes), the REPA target (the demo classifier or a DINOv2 checkout and weights), the
LPIPS backbone, the FID feature extractor's weights and the reference statistics, where the config
uses them; a GPU where the launcher asks for one. A file that the workflow itself produces
(anything under ``<study>/_shared/``, e.g. the pretrained VAE or the reference statistics) is
*pending*, not a failure: the row names the rule that writes it, and the rehearsal uses a
randomly initialised stand-in of the same architecture where the training loop needs one.

Verdicts: ``fail`` (red: the real run would fail or waste its compute: a missing file, out of
memory, a non-finite loss, a collapsed encoder, a layout that does not divide, a time limit too
short, too little disk), ``warn`` (amber: a loss that did not fall, memory near the limit), ``ok``.
Every failure names the config key to change. A rehearsal never raises: a failure is a row
(and so is a job that dies, e.g. killed for host memory: :func:`simflow.runner.run_preflight`),
so the report always has every row. :func:`build_report` turns the rows into
``results/<study>/preflight/report.{md,json}``, with the projected wall-clock and GPU-hours of
the whole study; :func:`log_report` attaches them to the study's MLflow parent run.
"""

from __future__ import annotations

import copy
import json
import math
import re
import resource
import shutil
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from simflow.config import Config, deep_merge, from_dict, to_dict
from simflow.contracts import DECODER_TRAINING_MODES, FROZEN_MODES, STAGE_FILES
from simflow.distributed import barrier, broadcast_object
from simflow.io import write_json, write_text
from simflow.tracking import log_run_outputs

#: Fraction of the rehearsal's steps over which the learning rate warms up (at most the real warm-up).
WARMUP_FRACTION = 0.2
#: Log windows of a rehearsal (train.log_every = steps / LOG_POINTS).
LOG_POINTS = 10
#: Peak memory above this fraction of the device's is a warning.
MEMORY_WARN_FRACTION = 0.9
#: The row file of a rehearsal inside its unit folder (the preflight stage's output), and the
#: rehearsal's own folder holding it (the real run's folder is never touched).
ROW_FILE = STAGE_FILES["preflight"]["row"]
REHEARSAL_DIR = ROW_FILE.rsplit("/", 1)[0]
#: Rules that write the files under ``<study>/_shared/<folder>/`` (a missing one there is pending).
PRODUCED_BY = {"pretrain_vae": "pretrain_vae", "feature_extractor": "feature_extractor", "fid_ref": "fid_ref"}
_RANK = {"ok": 0, "pending": 0, "skipped": 0, "warn": 1, "fail": 2}
_MARK = {"ok": "🟢 ok", "warn": "🟠 WARN", "fail": "🔴 FAIL"}

__all__ = ["build_report", "log_report", "rehearse", "render_markdown", "write_report"]


# ------------------------------------------------------------------------------------------
# findings
# ------------------------------------------------------------------------------------------
class Findings:
    """The checks of one row: ``{check, status, message, key, path, seconds}`` each, with status
    ``ok`` | ``pending`` (the workflow will produce it) | ``skipped`` | ``warn`` | ``fail``."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, check: str, status: str, message: str, key: str | None = None,
            path: str | None = None, seconds: float | None = None, rule: str | None = None) -> dict:
        item = {"check": check, "status": status, "message": message, "key": key, "path": path}
        if seconds is not None:
            item["seconds"] = round(seconds, 2)
        if rule is not None:
            item["rule"] = rule
        self.items.append(item)
        return item

    def verdict(self) -> str:
        return worst(i["status"] for i in self.items)


def worst(statuses) -> str:
    """The verdict of a set of statuses: fail > warn > ok (pending and skipped count as ok)."""
    rank = max((_RANK[s] for s in statuses), default=0)
    return {0: "ok", 1: "warn", 2: "fail"}[rank]


def produced_by(cfg, path: str | None) -> str | None:
    """The workflow rule that writes ``path`` (a file under ``<results_root>/<study>/_shared/``),
    or None for a file the user provides."""
    if not path:
        return None
    shared = (Path(cfg.results_root) / cfg.study / "_shared").resolve()
    try:
        rel = Path(path).resolve().relative_to(shared)
    except ValueError:
        return None
    return PRODUCED_BY.get(rel.parts[0]) if rel.parts else None


def _needed_file(findings: Findings, cfg, check: str, path: str | None, key: str, what: str,
                 standin: bool = False) -> str:
    """Record whether ``path`` (config key ``key``) exists: ok, pending (a workflow output), or
    fail. Returns the status."""
    if not path:
        findings.add(check, "fail", f"{what}: {key} is not set", key=key)
        return "fail"
    if Path(path).is_file() or Path(path).is_dir():
        findings.add(check, "ok", f"{what}: present", key=key, path=path)
        return "ok"
    rule = produced_by(cfg, path)
    if rule is not None:
        note = " (rehearsed with a randomly initialised stand-in)" if standin else ""
        findings.add(check, "pending", f"{what}: not there yet; rule {rule} writes it{note}",
                     key=key, path=path, rule=rule)
        return "pending"
    findings.add(check, "fail", f"{what}: {path} does not exist on {socket.gethostname()}",
                 key=key, path=path)
    return "fail"


# ------------------------------------------------------------------------------------------
# checks of what the real stages read
# ------------------------------------------------------------------------------------------
def check_dataset(findings: Findings, cfg, split: str, readers: str):
    """Build ``split`` of the configured dataset, decode every file of an image folder
    (:func:`check_image_files`), and read its first, middle and last image."""
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    from simflow.data import CheckedImageFolder, build_dataset
    t0 = time.perf_counter()
    try:
        ds = build_dataset(cfg.data.name, cfg.data.root, split, cfg.data.image_size,
                           on_bad_file=cfg.data.on_bad_file)
        n = len(ds)
        if n == 0:
            raise ValueError("the split is empty")
        if isinstance(ds, CheckedImageFolder):
            check_image_files(findings, cfg, ds, split)
        for i in sorted({0, n // 2, n - 1}):
            x, _ = ds[i]
            if tuple(x.shape) != (ds.channels, cfg.data.image_size, cfg.data.image_size):
                raise ValueError(f"image {i} has shape {tuple(x.shape)}")
    except Exception as err:  # noqa: BLE001 - every failure to read the data is a finding
        findings.add(f"data.{split}", "fail", f"dataset split {split!r} ({readers}) is not readable on "
                     f"{socket.gethostname()}: {type(err).__name__}: {err}", key="data.root",
                     path=cfg.data.root, seconds=time.perf_counter() - t0)
        return None
    findings.add(f"data.{split}", "ok", f"{cfg.data.name} {split}: {n} images of "
                 f"{ds.channels}×{cfg.data.image_size}×{cfg.data.image_size}, {ds.num_classes} classes",
                 key="data.root", path=cfg.data.root, seconds=time.perf_counter() - t0)
    return ds


def check_image_files(findings: Findings, cfg, ds, split: str) -> None:
    """Decode every file of an image-folder split (:func:`simflow.data.scan_image_files`, on
    ``launcher.cpus_per_task`` threads): unreadable files are a red row with
    ``data.on_bad_file=error`` (the real run would stop at the first it meets), amber with
    ``skip`` (it would leave them out); the row names them."""
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    from simflow.data import scan_image_files
    t0 = time.perf_counter()
    bad = scan_image_files(ds, cfg.launcher.cpus_per_task)
    n = len(ds)
    if not bad:
        findings.add(f"data.{split}.files", "ok", f"all {n} image files of split {split!r} decode",
                     key="data.root", path=cfg.data.root, seconds=time.perf_counter() - t0)
        return
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if cfg.data.on_bad_file == "error":
        status, then = "fail", ("the real run stops at the first one it meets (data.on_bad_file=error): "
                                "replace or remove them, or set data.on_bad_file=skip")
    else:
        status, then = "warn", ("the real run leaves them out (data.on_bad_file=skip), logging each and "
                                "counting them in its summary")
    findings.add(f"data.{split}.files", status, f"{len(bad)} of {n} image files of split {split!r} are "
                 f"unreadable: {shown}; {then}", key="data.on_bad_file / data.root", path=cfg.data.root,
                 seconds=time.perf_counter() - t0)


def _dinov2_files(kind: str, repo: str | None) -> tuple[bool, list[Path]]:
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    from simflow.losses import _hub_checkpoint
    base = kind.removesuffix("_reg")
    filename = f"{base}_reg4_pretrain.pth" if kind.endswith("_reg") else f"{base}_pretrain.pth"
    candidates = ([Path(repo) / filename] if repo else []) + [_hub_checkpoint(filename)]
    return bool(repo) and (Path(repo) / "hubconf.py").is_file(), candidates


def check_inputs(findings: Findings, cfg, stage: str) -> dict[str, bool]:
    """Check the weights and files the real stages of this unit read; returns which stand-ins
    the rehearsal needs (``pretrained_vae``, ``classifier``)."""
    m, e = cfg.model, cfg.eval
    standins = {"pretrained_vae": False, "classifier": False}
    trains_decoder = m.mode in DECODER_TRAINING_MODES
    if stage == "train" and m.mode in FROZEN_MODES:
        status = _needed_file(findings, cfg, "pretrained_vae", m.pretrained_vae, "model.pretrained_vae",
                              "pretrained VAE (frozen modes)", standin=True)
        standins["pretrained_vae"] = status != "ok"
    if stage == "train" and m.repa_weight > 0:
        if m.repa_target == "classifier":
            status = _needed_file(findings, cfg, "repa_target", m.repa_target_weights_path,
                                  "model.repa_target_weights_path", "REPA target (classifier)", standin=True)
            standins["classifier"] = status != "ok"
        else:
            has_repo, files = _dinov2_files(m.repa_target, m.repa_target_weights_path)
            weights = next((p for p in files if p.is_file()), None)
            if has_repo and weights is not None:
                findings.add("repa_target", "ok", f"REPA target {m.repa_target}: repository and {weights.name} present",
                             key="model.repa_target_weights_path", path=m.repa_target_weights_path)
            else:
                missing = "a DINOv2 checkout (a folder with hubconf.py)" if not has_repo else \
                    f"the weights (looked at {', '.join(map(str, files))})"
                findings.add("repa_target", "fail", f"REPA target {m.repa_target}: {missing} not found on "
                             f"{socket.gethostname()}; model.repa_target_weights_path="
                             f"{m.repa_target_weights_path!r}", key="model.repa_target_weights_path",
                             path=m.repa_target_weights_path)
    if trains_decoder and m.lpips_weight > 0:
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.losses import PerceptualLoss
        try:
            found = PerceptualLoss._find_backbone("vgg", m.lpips_backbone_weights_path)
            findings.add("lpips", "ok", f"LPIPS backbone: {found}", key="model.lpips_backbone_weights_path",
                         path=str(found))
        except FileNotFoundError as err:
            findings.add("lpips", "fail", f"LPIPS: {err}", key="model.lpips_backbone_weights_path",
                         path=m.lpips_backbone_weights_path)
    if stage != "train":
        return standins
    # the evaluation stages of the variant (fid-ref, fid, reconstruct)
    if e.feature_extractor == "simflow-classifier":
        _needed_file(findings, cfg, "feature_extractor", e.classifier_path, "eval.classifier_path",
                     "FID feature extractor (the demo classifier)")
    elif e.feature_extractor.startswith("inception"):
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.fid import inception_weights_cache_path
        if e.feature_extractor_weights_path:
            _needed_file(findings, cfg, "feature_extractor", e.feature_extractor_weights_path,
                         "eval.feature_extractor_weights_path", "Inception weights")
        elif inception_weights_cache_path().is_file():
            findings.add("feature_extractor", "ok", "Inception weights: in torch hub's cache",
                         key="eval.feature_extractor_weights_path", path=str(inception_weights_cache_path()))
        else:
            findings.add("feature_extractor", "fail", "Inception weights are not on "
                         f"{socket.gethostname()} ({inception_weights_cache_path()}): torch-fidelity would "
                         "download them at the first FID stage, which fails on an offline node; put the "
                         "file there or set eval.feature_extractor_weights_path",
                         key="eval.feature_extractor_weights_path")
    else:
        findings.add("feature_extractor", "skipped", f"feature extractor {e.feature_extractor!r}: not checked")
    status = _needed_file(findings, cfg, "reference_stats", e.reference_stats, "eval.reference_stats",
                          "FID reference statistics")
    if status == "ok" and Path(e.reference_stats).is_file():
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.fid import load_reference_statistics
        try:
            mu, _ = load_reference_statistics(e.reference_stats)
            findings.items[-1]["message"] += f" ({mu.size}-d)"
        except Exception as err:  # noqa: BLE001
            findings.items[-1].update(status="fail", message=f"FID reference statistics unreadable: {err}")
    return standins


# ------------------------------------------------------------------------------------------
# the rehearsal
# ------------------------------------------------------------------------------------------
class _Collector:
    """The training loop's logger: keeps the logged metrics (nothing goes to MLflow)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self.points.append((int(step or 0), dict(metrics)))

    def log_image(self, image, name: str) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value


def layout(global_batch: int, world: int, micro: int | None) -> dict:
    """Per-GPU batch, micro-batch and accumulation of ``global_batch`` over ``world`` ranks (the
    arithmetic of :func:`simflow.train.train`); ``error`` says why a layout does not work."""
    out: dict[str, Any] = {"world_size": world, "global_batch": global_batch}
    if global_batch % world:
        out["error"] = (f"train.global_batch_size={global_batch} is not divisible by the world size "
                        f"{world}")
        return out
    per = global_batch // world
    m = min(per, micro or per)
    out.update(per_gpu_batch=per, micro_batch=m)
    if per % m:
        out["error"] = f"the per-GPU batch {per} is not divisible by train.micro_batch_size={m}"
        return out
    out["accumulation"] = per // m
    return out


def rehearsal_config(cfg, rank_count: int, on_cpu: bool, standin_dir: Path, standins: dict[str, bool]):
    """The config the rehearsal trains with, and its layout (see the module docstring)."""
    d = to_dict(cfg)
    reduced = bool(on_cpu and cfg.preflight.cpu_overrides)
    if reduced:
        d = deep_merge(d, copy.deepcopy(cfg.preflight.cpu_overrides))
    t = from_dict(Config, copy.deepcopy(d)).train
    world = cfg.preflight.target_world_size
    real = layout(cfg.train.global_batch_size, world, cfg.train.micro_batch_size)
    mine = layout(t.global_batch_size, world, t.micro_batch_size)  # the same unless reduced
    if "error" in real or "error" in mine:
        return None, real, reduced
    steps = cfg.preflight.steps
    d["run_dir"] = str(Path(cfg.run_dir) / REHEARSAL_DIR)
    d["train"].update(
        steps=steps, global_batch_size=mine["per_gpu_batch"] * rank_count, micro_batch_size=mine["micro_batch"],
        warmup_steps=min(t.warmup_steps, max(1, round(WARMUP_FRACTION * steps))), min_lr_ratio=1.0,
        log_every=max(1, steps // LOG_POINTS), checkpoint_every=0, keep_every=0, fid_every=0,
        sample_every=0, resume="never", max_steps_this_run=None)
    d["tracking"]["enabled"] = False
    if standins.get("pretrained_vae"):
        d["model"]["pretrained_vae"] = str(standin_dir / "standin_vae.pt")
    if standins.get("classifier"):
        d["model"]["repa_target_weights_path"] = str(standin_dir / "standin_classifier.pt")
    return from_dict(Config, d), real, reduced


def write_standins(rcfg, dataset, standins: dict[str, bool]) -> None:
    """Randomly initialised stand-ins of the workflow-produced weights the training loop loads."""
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    import torch
    from simflow.checkpoints import atomic_save
    if standins.get("pretrained_vae"):
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.model import build_vae
        torch.manual_seed(0)
        atomic_save({"vae": build_vae(rcfg, dataset.channels).state_dict(), "standin": True},
                    Path(rcfg.model.pretrained_vae))
    if standins.get("classifier"):
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.classifier import SmallClassifier, save_classifier
        torch.manual_seed(0)
        # the architecture of the feature-extractor stage's classifier (width 16)
        model = SmallClassifier(dataset.channels, dataset.num_classes, 16, 128, rcfg.data.image_size)
        save_classifier(model, rcfg.model.repa_target_weights_path, {"standin": True})


def _median_rate(points: list[tuple[int, dict]]) -> float | None:
    rates = [m["train/img_per_s"] for _, m in points if "train/img_per_s" in m]
    steady = rates[1:] if len(rates) > 1 else rates  # the first window holds start-up costs
    return statistics.median(steady) if steady else None


def _fmt_gb(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def rehearse(cfg, env, run) -> dict:
    """The ``preflight`` stage (see the module docstring): checks, rehearsal, measurements; the
    row is written to ``<unit>/preflight/preflight.json`` by global rank 0 and returned."""
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    import torch
    t_start = time.perf_counter()
    findings = Findings()
    stage = cfg.preflight.stage
    vae_only = stage == "pretrain-vae"
    unit_dir = Path(cfg.run_dir)
    rdir = unit_dir / REHEARSAL_DIR
    on_cpu = env.device.type != "cuda"
    device_name = torch.cuda.get_device_name(env.device) if not on_cpu else "cpu"
    row: dict[str, Any] = {
        "unit": _unit_name(cfg), "variant": cfg.variant, "stage": stage, "host": socket.gethostname(),
        "device": device_name, "device_kind": env.device.type, "rehearsal_world_size": env.world_size,
        "precision": "bf16" if (cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and not on_cpu))
        else "fp32", "full_steps": cfg.train.steps,
    }

    # 1. the node
    wanted = cfg.launcher.gpus_per_node
    if wanted > 0 and on_cpu:
        findings.add("gpu", "fail", f"the launcher gives this job {wanted} GPU(s) but torch sees no CUDA "
                     f"device on {socket.gethostname()} (torch {torch.__version__}, CUDA build "
                     f"{torch.version.cuda}): check the node's driver and the torch build (README, notes "
                     "for real clusters)", key="launcher.gpus_per_node")
    train_set = check_dataset(findings, cfg, "train", "read by training") if env.is_main else None
    if env.is_main and stage == "train":
        check_dataset(findings, cfg, "test", "read by reconstruct, nll and latents")
    standins = check_inputs(findings, cfg, stage) if env.is_main else {}
    standins = broadcast_object(standins, env)

    # 2. the rehearsal
    rcfg, real_layout, reduced = rehearsal_config(cfg, env.world_size, on_cpu, rdir, standins)
    row["layout"] = real_layout
    row["reduced_scale"] = reduced
    row["cpu_overrides"] = cfg.preflight.cpu_overrides if reduced else {}
    skip = None
    if "error" in real_layout:
        findings.add("layout", "fail", f"the real run cannot start: {real_layout['error']}",
                     key="train.global_batch_size / train.micro_batch_size / the train launcher's GPUs")
        skip = "the layout does not divide"
    elif wanted > 0 and on_cpu and not reduced:
        skip = "no GPU (and no preflight.cpu_overrides for a reduced CPU rehearsal)"
    elif env.is_main and train_set is None:
        skip = "the training data is not readable"
    skip = broadcast_object(skip, env)
    rehearsal: dict[str, Any] = {"ran": False, "steps": cfg.preflight.steps}
    result = None
    collector = _Collector()
    if skip is not None:
        rehearsal["skipped"] = skip
        findings.add("rehearsal", "skipped", f"not rehearsed: {skip}")
    else:
        rehearsal.update(global_batch=rcfg.train.global_batch_size, micro_batch=rcfg.train.micro_batch_size,
                         warmup_steps=rcfg.train.warmup_steps, log_every=rcfg.train.log_every,
                         lr=rcfg.train.lr, vae_lr=rcfg.train.vae_lr)
        if env.is_main and any(standins.values()):
            write_standins(rcfg, train_set, standins)
        barrier(env)
        if not on_cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(env.device)
        t0 = time.perf_counter()
        # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
        from simflow.checkpoints import NonFiniteLossError
        from simflow.train import train
        try:
            result = train(rcfg, env, collector if env.is_main else None, vae_only=vae_only)
            rehearsal["ran"] = True
        except NonFiniteLossError as err:
            m = re.search(r"at step (\d+)", str(err))
            row["nonfinite_step"] = int(m.group(1)) if m else None
            findings.add("nonfinite", "fail", f"non-finite loss at step {row['nonfinite_step']} of the "
                         f"rehearsal ({row['precision']}, lr {rcfg.train.lr:g}, vae_lr {rcfg.train.vae_lr:g})",
                         key="train.lr / train.vae_lr / model.decoder_scale / train.precision")
        except Exception as err:  # noqa: BLE001 - every failure is a row
            _training_failure(findings, err, real_layout, row)
        rehearsal["seconds"] = round(time.perf_counter() - t0, 2)
        rehearsal["steps_logged"] = collector.points[-1][0] if collector.points else 0
    row["rehearsal"] = rehearsal
    if not env.is_main:
        return {}

    # 3. measurements
    _measure(row, findings, cfg, rcfg, env, collector, result, real_layout, vae_only, on_cpu, reduced,
             standin_vae=bool(standins.get("pretrained_vae")))
    if rdir.joinpath("checkpoints").exists():
        shutil.rmtree(rdir / "checkpoints", ignore_errors=True)  # never resumed; its size is recorded
    for name in ("standin_vae.pt", "standin_classifier.pt"):
        (rdir / name).unlink(missing_ok=True)
    row["checks"] = findings.items
    row["verdict"] = findings.verdict()
    row["seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(unit_dir / ROW_FILE, row)
    run.set_tags({"simflow.preflight": row["verdict"]})
    run.log_artifact(unit_dir / ROW_FILE, "preflight")
    print(summary_line(row), flush=True)
    return row


def _unit_name(cfg) -> str:
    run_dir = Path(cfg.run_dir)
    study_dir = Path(cfg.results_root) / cfg.study
    try:
        return str(run_dir.resolve().relative_to(study_dir.resolve()))
    except ValueError:
        return str(run_dir)


def _training_failure(findings: Findings, err: Exception, real: dict, row: dict) -> None:
    text = f"{type(err).__name__}: {err}"
    oom = "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower()
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    import torch
    if isinstance(err, torch.cuda.OutOfMemoryError) or oom:
        half = max(1, real["micro_batch"] // 2)
        findings.add("memory", "fail", f"out of memory at the configured micro-batch {real['micro_batch']} "
                     f"(per-GPU batch {real['per_gpu_batch']}, accumulation {real['accumulation']}); "
                     f"try train.micro_batch_size: {half} (accumulation {real['per_gpu_batch'] // half})",
                     key="train.micro_batch_size")
        row["oom"] = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    if isinstance(err, FileNotFoundError):  # e.g. weights the model loads (DatasetNotFoundError too)
        findings.add("files", "fail", f"the training loop could not start: {text}")
        return
    findings.add("error", "fail", f"the rehearsal failed: {text}",
                 key=None, path=None).update(traceback=traceback.format_exc()[-3000:])


def _measure(row, findings, cfg, rcfg, env, collector, result, real, vae_only, on_cpu, reduced,
             standin_vae: bool = False) -> None:
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    import torch
    points = collector.points
    curve = [[s, m["train/total"]] for s, m in points if "train/total" in m]
    row["loss"] = {"curve": curve}
    if len(curve) >= 2:
        first, last = curve[0][1], curve[-1][1]
        row["loss"].update(first=first, last=last, min=min(v for _, v in curve), falls=last < first)
        if result is not None and not last < first:
            findings.add("loss", "warn", f"the loss did not fall over the rehearsal ({first:.4g} → {last:.4g} "
                         f"in {curve[-1][0]} steps)", key="train.lr / train.warmup_steps / model.*")
    summary = result.summary if result is not None else {}
    # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
    from simflow.rate import RATE_KEYS
    last = points[-1][1] if points else {}
    row["rate"] = summary.get("rate") or {k: last[f"train/{k}"] for k in RATE_KEYS if f"train/{k}" in last}
    row["collapsed"] = summary.get("collapsed")
    row["collapse_alarm_step"] = summary.get("collapse_alarm_step")
    row.setdefault("nonfinite_step", None)
    rate = (row["rate"] or {}).get("rate_per_dim")
    threshold = cfg.train.collapse_threshold
    if standin_vae and (row["collapse_alarm_step"] is not None or row["collapsed"]):
        # a frozen variant rehearsed on a random stand-in of the VAE the workflow will pre-train:
        # its latents say nothing about the real one's, so neither does their rate
        findings.add("collapse", "skipped", "not judged: rehearsed on a randomly initialised stand-in of "
                     f"the pretrained VAE (rate {rate:.4f} nats/dim); the real run's latents come from "
                     "the pre-trained one")
    elif row["collapse_alarm_step"] is not None:
        reason = summary.get("collapse_alarm_reason") or f"rate below {threshold} nats/dim"
        findings.add("collapse", "fail", f"collapse alarm at step {row['collapse_alarm_step']}: {reason} for "
                     f"{cfg.train.collapse_patience} log steps (last rate {rate:.4f} nats/dim); the encoder "
                     "carries almost nothing about the image",
                     key="model.decoder_scale / train.collapse_threshold / train.collapse_min_active_fraction")
    elif row["collapsed"]:
        reasons = "; ".join(summary.get("collapse_final_reasons") or
                            [f"rate {rate:.4f} nats/dim < train.collapse_threshold {threshold}"])
        findings.add("collapse", "fail", f"collapsed at the end of the rehearsal: {reasons}",
                     key="model.decoder_scale")
    elif rate is not None:
        findings.add("collapse", "ok", f"rate {rate:.4f} nats/dim ≥ {threshold}")

    # memory
    mem: dict[str, Any] = {}
    if "seconds" not in row["rehearsal"]:  # not rehearsed: nothing to measure
        pass
    elif not on_cpu:
        total = torch.cuda.get_device_properties(env.device).total_memory
        peak = torch.cuda.max_memory_allocated(env.device)
        mem.update(kind="cuda max_memory_allocated", peak_gb=_fmt_gb(peak),
                   reserved_gb=_fmt_gb(torch.cuda.max_memory_reserved(env.device)), device_total_gb=_fmt_gb(total))
        groups = summary.get("num_params") or {}
        world = cfg.preflight.target_world_size
        buffer = 4 * max(groups.values()) if groups and world > 1 else 0
        mem["allreduce_buffer_gb"] = _fmt_gb(buffer)
        mem["projected_peak_gb"] = _fmt_gb(peak + buffer)
        if result is not None and peak + buffer > MEMORY_WARN_FRACTION * total:
            findings.add("memory", "warn", f"peak {peak / 2**30:.1f} GiB (+ {buffer / 2**30:.1f} GiB flat all-reduce "
                         f"buffer at world size {world}) of {total / 2**30:.0f} GiB", key="train.micro_batch_size")
    else:
        mem.update(kind="host max RSS of the process",
                   peak_gb=_fmt_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    row["memory"] = mem

    # throughput and MFU
    img_s = _median_rate(points) if result is not None else None
    thr: dict[str, Any] = {"img_per_s": img_s}
    if img_s:
        thr["img_per_s_per_device"] = img_s / env.world_size
        thr["s_per_step"] = rcfg.train.global_batch_size / img_s
        if not on_cpu and not vae_only:
            # lazy: torch (~2.5 CPU-s) stays out of the report script and the runner's submit path
            from simflow.flops import bf16_peak_tflops, train_flops
            flops = train_flops(result.model.flow, rcfg.train.global_batch_size)["total_flops"]
            achieved = flops / thr["s_per_step"] / 1e12
            peak = bf16_peak_tflops(env.device)
            thr.update(flow_tflops=achieved, peak_bf16_tflops=peak,
                       mfu=achieved / (peak * env.world_size) if peak else None)
    row["throughput"] = thr

    # disk
    disk: dict[str, Any] = {}
    ckpt = Path(rcfg.run_dir) / "checkpoints" / "latest.pt" if rcfg is not None else None
    probe = Path(cfg.run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    disk.update(path=str(probe), free_gb=_fmt_gb(free))
    if ckpt is not None and ckpt.is_file() and result is not None:
        size = ckpt.stat().st_size
        state = sum(t.numel() * t.element_size() for t in result.model.state_dict().values())
        keep = cfg.train.steps // cfg.train.keep_every if cfg.train.keep_every else 0
        need = size * (2 + keep) + 2 * state  # latest.pt and its temporary copy, kept ones, final weights
        disk.update(checkpoint_gb=_fmt_gb(size), kept_checkpoints=keep, need_gb=_fmt_gb(need))
        if reduced:
            disk["note"] = "reduced scale: not the real run's size"
        elif need > free:
            findings.add("disk", "fail", f"the run needs about {need / 2**30:.1f} GiB (checkpoint "
                         f"{size / 2**30:.2f} GiB × {2 + keep} + final weights) but {free / 2**30:.1f} GiB are "
                         f"free at {probe}", key="train.keep_every / results_root")
        else:
            findings.add("disk", "ok", f"needs ~{need / 2**30:.2f} GiB of {free / 2**30:.0f} GiB free")
    row["disk"] = disk

    # projection of the full run
    proj: dict[str, Any] = {"steps": cfg.train.steps, "world_size": cfg.preflight.target_world_size}
    if reduced:
        proj["note"] = "reduced scale on CPU: no projection"
    elif img_s and "per_gpu_batch" in real:
        s_step = real["per_gpu_batch"] / thr["img_per_s_per_device"]
        wall = cfg.train.steps * s_step
        proj.update(s_per_step=s_step, wall_s=wall, device_hours=wall * real["world_size"] / 3600,
                    device_kind=env.device.type,
                    basis=f"{thr['img_per_s_per_device']:.1f} img/s per {'GPU' if not on_cpu else 'process'}, "
                          "perfect scaling (no all-reduce time): a lower bound")
    row["projection"] = proj


def summary_line(row: dict) -> str:
    bad = [c["message"] for c in row.get("checks", []) if c["status"] in ("fail", "warn")]
    return f"preflight {row['unit']}: {row['verdict'].upper()}" + (f": {'; '.join(bad)}" if bad else "")


# ------------------------------------------------------------------------------------------
# the command (a row even when the job dies)
# ------------------------------------------------------------------------------------------
def failed_row(cfg, check: str, message: str, key: str | None = None) -> dict:
    """The row of a rehearsal that produced none (its job died, or it could not start)."""
    findings = Findings()
    findings.add(check, "fail", message, key=key)
    return {"unit": _unit_name(cfg), "variant": cfg.variant, "stage": cfg.preflight.stage,
            "host": None, "device": None, "device_kind": None, "full_steps": cfg.train.steps,
            "layout": layout(cfg.train.global_batch_size, cfg.preflight.target_world_size,
                             cfg.train.micro_batch_size),
            "rehearsal": {"ran": False, "steps": cfg.preflight.steps}, "checks": findings.items,
            "verdict": "fail", "projection": {"steps": cfg.train.steps}}


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------
def _time_limit(row: dict, entry: dict) -> dict | None:
    """A failure when the projected run needs more attempts than its launcher's time limit and
    requeues allow (SLURM and submitit-local only: the local backend has no time limit)."""
    launcher, wall = entry["launcher"], (row.get("projection") or {}).get("wall_s")
    if launcher["backend"] == "local" or not wall:
        return None
    per_attempt = max(60.0, launcher["timeout_min"] * 60 - launcher["signal_delay_s"])
    attempts = math.ceil(wall / per_attempt)
    allowed = launcher["max_num_timeout"] + 1
    if attempts <= allowed:
        return None
    stage = row["stage"].replace("-", "_")
    return {"check": "time_limit", "status": "fail",
            "message": f"the full run needs about {attempts} attempts of {launcher['timeout_min']} min "
                       f"(projected {_duration(wall)}) but the launcher allows {allowed} "
                       f"(max_num_timeout {launcher['max_num_timeout']})",
            "key": f"launcher_{stage}_max_num_timeout / launcher_{stage}_timeout_min", "path": None}


def build_report(rows: list[dict], plan: list[dict], study: str, steps: int,
                 cpu_overrides: dict | None = None) -> dict:
    """The study's preflight report from its rows (in ``plan`` order) and the study's ``plan``
    (:func:`simflow.study.preflight_plan`)."""
    by_unit = {r["unit"]: r for r in rows}
    out_rows, study_checks = [], []
    for entry in plan:
        row = copy.deepcopy(by_unit.get(entry["unit"]) or {
            "unit": entry["unit"], "verdict": "fail", "checks": [
                {"check": "row", "status": "fail", "message": "no preflight row", "key": None, "path": None}]})
        row.update(name=entry["name"], group=entry["group"], runs=entry["runs"], after=entry["after"],
                   real_launcher=entry["launcher"], world_size=entry["world_size"])
        extra = _time_limit(row, entry)
        if extra is not None:
            row["checks"].append(extra)
        row["verdict"] = worst(c["status"] for c in row["checks"])
        out_rows.append(row)

    def hours(r):
        p = r.get("projection") or {}
        return p.get("device_hours")

    projected = [r for r in out_rows if hours(r) is not None]
    missing = [r["name"] for r in out_rows if hours(r) is None]
    kinds = sorted({(r.get("projection") or {}).get("device_kind") for r in projected})
    totals: dict[str, Any] = {
        "device_hours": sum(hours(r) * r["runs"] for r in projected),
        "device_kind": kinds[0] if len(kinds) == 1 else "mixed",
        "serial_wall_s": sum(r["projection"]["wall_s"] * r["runs"] for r in projected),
        "not_projected": missing, "runs": sum(r["runs"] for r in out_rows)}
    # every run at once: the variants start together; the frozen ones wait for the pretrained VAE
    wall = {r["name"]: r["projection"]["wall_s"] for r in projected}
    pre = wall.get("pretrain_vae", 0.0)
    alone = max((wall[r["name"]] for r in projected if not r["after"] and r["name"] != "pretrain_vae"),
                default=0.0)
    after = max((pre + wall[r["name"]] for r in projected if r["after"]), default=pre)
    totals["parallel_wall_s"] = max(alone, after)
    totals["critical_path"] = "pretrain_vae → the slowest frozen variant" if after > alone else "the slowest variant"
    need = sum(((r.get("disk") or {}).get("need_gb") or 0.0) * r["runs"] for r in out_rows)
    frees = [(r.get("disk") or {}).get("free_gb") for r in out_rows if (r.get("disk") or {}).get("free_gb") is not None]
    totals["disk_need_gb"] = need
    totals["disk_free_gb"] = min(frees) if frees else None
    if frees and need > min(frees):
        study_checks.append({"check": "disk", "status": "fail", "key": "results_root / train.keep_every",
                             "message": f"the study's runs need about {need:.1f} GiB of checkpoints and weights "
                                        f"together, but {min(frees):.1f} GiB are free", "path": None})
    verdict = worst([r["verdict"] for r in out_rows] + [c["status"] for c in study_checks])
    return {"study": study, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "verdict": verdict,
            "rehearsal_steps": steps, "cpu_overrides": cpu_overrides or {}, "rows": out_rows,
            "study_checks": study_checks, "totals": totals,
            "counts": {v: sum(r["verdict"] == v for r in out_rows) for v in ("ok", "warn", "fail")}}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _row_cells(r: dict) -> list[str]:
    loss = r.get("loss") or {}
    trend = (f"{loss['first']:.3g} → {loss['last']:.3g} {'↓' if loss['falls'] else '↑'}"
             if "first" in loss else "–")
    rate = (r.get("rate") or {}).get("rate_per_dim")
    if any(c["check"] == "collapse" and c["status"] == "skipped" for c in r.get("checks", [])):
        collapse = "– (stand-in VAE)"
    elif r.get("collapse_alarm_step") is not None:
        collapse = f"**yes** (alarm, step {r['collapse_alarm_step']})"
    elif r.get("collapsed"):
        collapse = "**yes** (end of rehearsal)"
    else:
        collapse = "no" if r.get("collapsed") is False else "–"
    nonfinite = f"**step {r['nonfinite_step']}**" if r.get("nonfinite_step") is not None else (
        "none" if (r.get("rehearsal") or {}).get("ran") else "–")
    mem = r.get("memory") or {}
    if mem.get("device_total_gb"):
        memory = f"{mem['peak_gb']:.1f} of {mem['device_total_gb']:.0f} GiB"
        if mem.get("allreduce_buffer_gb"):
            memory += f" (+{mem['allreduce_buffer_gb']:.1f})"
    elif mem.get("peak_gb") is not None:
        memory = f"{mem['peak_gb']:.2f} GiB RSS"
    else:
        memory = "**OOM**" if r.get("oom") else "–"
    if r.get("oom"):
        memory = "**OOM**"
    thr = r.get("throughput") or {}
    img = _num(thr.get("img_per_s"), ".1f")
    mfu = f"{100 * thr['mfu']:.1f} %" if thr.get("mfu") is not None else "–"
    lay = r.get("layout") or {}
    layout_text = (f"{lay['world_size']} × {lay['per_gpu_batch']} = {lay['micro_batch']} × {lay['accumulation']}"
                   if "accumulation" in lay else f"**{lay.get('error', '–')}**")
    proj = r.get("projection") or {}
    unit = "GPU-h" if proj.get("device_kind") == "cuda" else "CPU-h"
    full = f"{proj.get('steps', '–')} steps: {_duration(proj.get('wall_s'))}"
    hours = (f"{proj['device_hours']:.3g} {unit}" + (f" × {r['runs']}" if r.get("runs", 1) > 1 else "")
             if proj.get("device_hours") is not None else (proj.get("note") or "–"))
    bad = [c for c in r.get("checks", []) if c["status"] in ("fail", "warn")]
    reasons = "; ".join(f"{c['check']}: {c['message']}" + (f" (key `{c['key']}`)" if c.get("key") else "")
                        for c in bad) or "–"
    return [_MARK[r["verdict"]], f"`{r.get('name', r['unit'])}`", r.get("stage", "–"), trend,
            _num(rate, ".3f"), collapse, nonfinite, memory, img, mfu, layout_text, full, hours, reasons]


def render_markdown(report: dict) -> str:
    t = report["totals"]
    c = report["counts"]
    rows = report["rows"]
    devices = sorted({f"{r.get('device')} ({r.get('host')})" for r in rows if r.get("device")})
    unit = "GPU-hours" if t["device_kind"] == "cuda" else "CPU-hours" if t["device_kind"] == "cpu" else "device-hours"
    lines = [
        f"# Preflight of study `{report['study']}`", "",
        f"**Verdict: {_MARK[report['verdict']]}**: {c['fail']} red, {c['warn']} amber, {c['ok']} green "
        f"of {len(rows)} training runs rehearsed ({report['created']}).", "",
        f"Each row is a rehearsal of {report['rehearsal_steps']} steps of one training run (the first seed "
        "of a variant, or the shared pretrained VAE) through `simflow preflight`: the real stage code and "
        "launcher on one node and one GPU, at the configured per-GPU batch and micro-batch, the learning "
        "rate warmed up and then held at its peak. Ran on: " + (", ".join(devices) or "–") + ".",
    ]
    if report.get("cpu_overrides"):
        lines += ["", "Rehearsals on a CPU ran at a **reduced scale**: "
                  f"`{json.dumps(report['cpu_overrides'])}` (no projection from them)."]
    lines += ["", "## Study", "",
              f"* Projected compute of the full study: **{t['device_hours']:.4g} {unit}** over {t['runs']} "
              f"training runs (seeds included; evaluation stages not included)."
              + (f" Not projected: {', '.join(t['not_projected'])}." if t["not_projected"] else ""),
              f"* Wall-clock: **{_duration(t['parallel_wall_s'])}** if every run starts at once "
              f"(critical path: {t['critical_path']}); {_duration(t['serial_wall_s'])} one run at a time.",
              f"* Disk: about {t['disk_need_gb']:.3g} GiB of checkpoints and final weights, "
              f"{_num(t['disk_free_gb'], '.4g')} GiB free."]
    for check in report["study_checks"]:
        lines.append(f"* {_MARK[check['status']]} {check['check']}: {check['message']} (key `{check['key']}`)")
    header = ["", "variant", "stage", "loss first → last", "rate (nats/dim)", "collapse", "non-finite",
              "peak memory / GPU", "img/s", "MFU (flow)", "layout: world × per-GPU = micro × accum.",
              "full run", "compute", "reasons (key to change)"]
    lines += ["", "## Runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in _row_cells(r)) + " |")
    pending: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for chk in r.get("checks", []):
            if chk["status"] == "pending":
                pending.setdefault((chk.get("rule") or "?", chk["message"]), []).append(r.get("name", r["unit"]))
    if pending:
        lines += ["", "## Produced by the workflow (not there yet, not a failure)", ""]
        for (rule, message), names in pending.items():
            lines.append(f"* rule `{rule}`: {message}; for {', '.join(f'`{n}`' for n in names)}")
    lines += ["", "## How to read this", "",
              "* 🔴 **FAIL**: the real run would fail or waste its compute; the reason names the key to change. "
              "🟠 **WARN**: worth a look before submitting (a loss that did not fall, memory near the limit). "
              "🟢 ok: nothing found.",
              "* *rate*: nats per latent dimension above the posterior-entropy floor at the last log window; "
              "*collapse*: the collapse alarm (`train.collapse_threshold`, `train.collapse_patience`) or a final "
              "rate below the threshold. *non-finite*: the step of a NaN/inf loss.",
              "* *peak memory*: `torch.cuda.max_memory_allocated` at the configured micro-batch; (+x): the flat "
              "gradient buffer of the all-reduce that a multi-GPU run adds. On CPU: the process's peak RSS.",
              "* *img/s*: median over the log windows after the first; *MFU*: the flow's FLOPs (`simflow bench`'s "
              "count) against the GPU's dense bf16 peak, a lower bound (VAE, LPIPS and GAN not counted).",
              "* *full run*: the real `train.steps` at the rehearsal's speed per GPU on the configured layout, "
              "assuming perfect scaling: a lower bound on the wall-clock.",
              "* Each row's details (checks, loss curve, rate monitor, disk): "
              "`<unit>/preflight/preflight.json`; all rows: `report.json`."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, markdown_path: str | Path, json_path: str | Path) -> str:
    text = render_markdown(report)
    write_text(markdown_path, text)
    write_json(Path(json_path), report)
    return text


def log_report(paths: list[str | Path], tracking_uri: str, parent_run_id_file: str | Path,
               report: dict) -> str | None:
    """Attach the report files to the study's MLflow parent run (artifacts under ``preflight/``,
    tag ``simflow.preflight`` = the verdict, metric ``preflight/device_hours``); returns the run
    id, or None when tracking is disabled (the parent file holds no run id)."""
    return log_run_outputs(tracking_uri, Path(parent_run_id_file), artifacts={"preflight": paths},
                           metrics={"preflight/device_hours": float(report["totals"]["device_hours"])},
                           tags={"simflow.preflight": report["verdict"]})
