"""Checkpoints of the training loop: writing, reading, choosing what to resume from, and the NaN
guard's bookkeeping (which checkpoint is the last one with a sane loss).

``<run_dir>/checkpoints/`` holds ``latest.pt``, ``previous.pt`` and, while the run diverges,
``last_sane.pt`` (:class:`CheckpointKeeper`); every file is one dict (model, EMA, optimisers,
step, RNG states, the resolved config it was written with, the loss record), written atomically
and read back before it replaces the old one (:func:`atomic_save`).

A resume checks that the checkpoint belongs to this configuration (:func:`check_resume_config`):
the keys of :data:`RESUMABLE_KEYS` (the length of the run, logging and checkpoint cadence, where
and how it runs, the learning rates) may change between the run that wrote the checkpoint and
the one that resumes it; any other difference is a :class:`ResumeMismatchError` unless
``train.resume_mismatch=allow``.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simflow.config import Config, to_dict
from simflow.io import atomic_write


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN/inf; names the step and the last checkpoint whose loss was in a
    sane range (see :class:`CheckpointKeeper`), with its loss."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, not a checkpoint); names the file."""



def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch archive whose members
    all pass their CRC-32 check (``torch.save`` writes a zip file with CRCs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a complete checkpoint ({err})") from err
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC check (corrupt write)")


def atomic_save(obj: Any, path: Path, commit=None) -> None:
    """``torch.save`` through :func:`simflow.io.atomic_write`: the new file replaces ``path``
    only once it has been written completely and reads back (:func:`verify_checkpoint`)."""
    def verify(tmp: Path) -> None:
        try:
            verify_checkpoint(tmp)
        except CheckpointError as err:
            raise CheckpointError(f"writing {path} produced an unreadable file ({err}); {path.name} "
                                  "was not replaced") from err

    atomic_write(path, lambda tmp: torch.save(obj, tmp), verify=verify, commit=commit)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """``torch.load`` of a checkpoint written by this package; a truncated or corrupt file raises
    :class:`CheckpointError` naming it (a missing one FileNotFoundError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        # the first sentence: torch appends a paragraph of generic advice to its zip errors
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or corrupt "
                              f"({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a simflow checkpoint (a {type(ckpt).__name__})")
    return ckpt



def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


#: Files of ``<run_dir>/checkpoints/`` (see :class:`CheckpointKeeper`).
LATEST, PREVIOUS, LAST_SANE = "latest.pt", "previous.pt", "last_sane.pt"
#: A checkpoint is "sane" when the worst per-step loss since the one before it is finite and at
#: most ``reference + SANE_LOSS_FACTOR * max(1, |reference|)``, where ``reference`` is the lowest
#: mean loss of a sane checkpoint interval so far. A diverging run (loss 1e11 where it was 1)
#: leaves that range long before the loss becomes NaN.
SANE_LOSS_FACTOR = 10.0


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The first checkpoint :func:`load_resume_checkpoint` would try (None: start afresh)."""
    candidates = resume_candidates(cfg)
    return candidates[0] if candidates else None


def resume_candidates(cfg: Config) -> list[Path]:
    """Checkpoints to resume from, best first: ``train.resume`` if it is a path; with ``auto``
    latest.pt, then previous.pt, last_sane.pt and the kept step_*.pt, newest first."""
    if cfg.train.resume == "never":
        return []
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        if not path.exists():
            raise FileNotFoundError(f"train.resume={cfg.train.resume}: no such checkpoint")
        return [path]
    folder = checkpoint_dir(cfg)
    named = [folder / name for name in (LATEST, PREVIOUS, LAST_SANE)]
    kept = sorted(folder.glob("step_*.pt"), reverse=True)
    return [p for p in named + kept if p.is_file()]


def load_resume_checkpoint(cfg: Config, map_location: Any) -> tuple[Path | None, dict | None, list[Path]]:
    """(path, checkpoint, unreadable files skipped) of the checkpoint to resume from.

    With ``train.resume=auto`` an unreadable file (a truncated write, a corrupt disk) is skipped
    with a warning naming it, and the next candidate of :func:`resume_candidates` is used; if
    none can be read, :class:`CheckpointError` lists them all. An explicit ``train.resume`` path
    that cannot be read is an error naming it.
    """
    failures: list[tuple[Path, CheckpointError]] = []
    for path in resume_candidates(cfg):
        try:
            ckpt = load_checkpoint(path, map_location)
            if not {"model", "optimizers", "ema", "step", "rng"} <= set(ckpt):
                raise CheckpointError(f"{path} is not a training checkpoint (keys: {sorted(ckpt)})")
        except CheckpointError as err:
            if cfg.train.resume != "auto":
                raise CheckpointError(f"train.resume: {err}") from err
            failures.append((path, err))
            continue
        if failures:
            warnings.warn("; ".join(str(e) for _, e in failures) + f". Resuming from {path} "
                          f"(step {ckpt['step']}) instead.", RuntimeWarning, stacklevel=2)
        return path, ckpt, [p for p, _ in failures]
    if failures:
        raise CheckpointError(
            "no readable checkpoint to resume from: " + "; ".join(str(e) for _, e in failures)
            + f". Move them out of {checkpoint_dir(cfg)} (or set train.resume=never) to train "
            "from scratch.")
    return None, None, []


class CheckpointKeeper:
    """Writes ``<run_dir>/checkpoints/`` and knows which checkpoint the NaN guard can stand behind.

    * ``latest.pt``: the newest checkpoint (an exact resume point);
    * ``previous.pt``: the one before; it is replaced only after a new ``latest.pt`` has been
      written and read back, so a corrupt or interrupted write always leaves one readable file;
    * ``last_sane.pt``: the last checkpoint whose loss was in the sane range (see
      :data:`SANE_LOSS_FACTOR`), kept only while ``latest.pt`` is outside it.

    Every checkpoint carries a ``loss`` record (mean and worst loss since the previous
    checkpoint, whether that is sane, the reference, and where the last sane checkpoint is), so
    a resumed run keeps judging by the same standard. :meth:`observe` is called every step and
    :meth:`close_window` at every checkpoint on every rank; :meth:`write` on the main rank only.
    """

    def __init__(self, folder: Path, resumed: dict | None = None, resumed_path: Path | None = None,
                 unreadable: list[Path] | None = None):
        self.folder = Path(folder)
        self.unreadable = {Path(p) for p in unreadable or []}
        record = dict((resumed or {}).get("loss") or {})
        self.reference: float | None = record.get("reference")
        self.last: dict | None = None  # the record of the newest checkpoint
        self.sane: dict | None = None  # {"path", "step", "loss"} of the last sane checkpoint
        if resumed is not None and resumed_path is not None:
            self.last = {"step": resumed["step"], "mean": record.get("mean"), "max": record.get("max"),
                         "sane": record.get("sane", True)}
            if self.last["sane"]:
                self.sane = {"path": str(resumed_path), "step": resumed["step"], "loss": record.get("mean")}
            elif record.get("last_sane") and Path(record["last_sane"]["path"]).is_file():
                self.sane = dict(record["last_sane"])
        self._sum, self._n, self._max = 0.0, 0, -math.inf
        self._keep_as = PREVIOUS
        self._drop_last_sane = False

    def observe(self, loss: float) -> None:
        self._sum += loss
        self._n += 1
        self._max = max(self._max, loss)

    def _is_sane(self, worst: float) -> bool:
        if not math.isfinite(worst):
            return False
        ref = self.reference
        return ref is None or worst <= ref + SANE_LOSS_FACTOR * max(1.0, abs(ref))

    def close_window(self, step: int) -> dict:
        """The ``loss`` record of the checkpoint at ``step``; decides what the outgoing
        ``latest.pt`` becomes (previous.pt, or last_sane.pt if it is the last sane one)."""
        if self._n:
            mean, worst = self._sum / self._n, self._max
            sane = self._is_sane(worst)
            if sane:
                self.reference = mean if self.reference is None else min(self.reference, mean)
        else:  # no step since the last checkpoint: the same weights, the same verdict
            mean, worst = (self.last or {}).get("mean"), (self.last or {}).get("max")
            sane = (self.last or {}).get("sane", True)
        self._sum, self._n, self._max = 0.0, 0, -math.inf
        latest = str(self.folder / LATEST)
        if self.sane is not None and self.sane["path"] == latest and not sane:
            self._keep_as = LAST_SANE
            self.sane = {**self.sane, "path": str(self.folder / LAST_SANE)}
        else:
            self._keep_as = PREVIOUS
        self._drop_last_sane = sane
        if sane:
            self.sane = {"path": latest, "step": step, "loss": mean}
        self.last = {"step": step, "mean": mean, "max": worst, "sane": sane}
        return {**self.last, "reference": self.reference,
                "last_sane": None if self.sane is None else dict(self.sane)}

    def write(self, state: dict) -> Path:
        """Write ``state`` (with its ``loss`` record) as latest.pt; the old latest.pt becomes
        previous.pt (or last_sane.pt) once the new one has been written and read back.

        Disk use stays at two checkpoints during the write: the old previous.pt is removed first,
        once latest.pt has been checked to read back (it is the fallback meanwhile); an
        unreadable latest.pt (found so now or at resume) goes instead and previous.pt stays.
        """
        latest = self.folder / LATEST
        if latest.exists() and latest not in self.unreadable:
            try:
                verify_checkpoint(latest)
            except CheckpointError as err:
                warnings.warn(f"{err}: replacing it, previous.pt is kept", RuntimeWarning, stacklevel=2)
                self.unreadable.add(latest)
        if latest in self.unreadable:
            latest.unlink(missing_ok=True)
            self.unreadable.discard(latest)
            if self._keep_as == LAST_SANE:  # it was the last sane checkpoint: there is none now
                self.sane = None
            self._keep_as = PREVIOUS
        elif latest.exists():
            (self.folder / PREVIOUS).unlink(missing_ok=True)

        def commit(tmp: Path, path: Path) -> None:
            if path.exists():
                os.replace(path, self.folder / self._keep_as)
            os.replace(tmp, path)

        atomic_save(state, latest, commit=commit)
        if self._drop_last_sane:
            (self.folder / LAST_SANE).unlink(missing_ok=True)
        return latest

    def clean_temporary_files(self) -> None:
        """Remove the temporary files of writes that a killed process left behind."""
        for tmp in self.folder.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)


def non_finite_message(loss: float, step: int, cfg: Config, keeper: CheckpointKeeper) -> str:
    """The NaN guard's message: where the last sane checkpoint is, its loss, and how to resume."""
    head = f"non-finite loss ({loss}) at step {step} of {cfg.variant}; "
    sane = keeper.sane
    if sane is None:
        return head + ("no checkpoint with a sane loss was written yet, so there is nothing to resume "
                       "from: lower train.lr / model.nll_weight, or check the data, and train again "
                       "with train.resume=never.")
    loss_text = "loss not recorded" if sane.get("loss") is None else f"mean loss {sane['loss']:.4g}"
    text = (head + f"the last checkpoint with a sane loss is {sane['path']} (step {sane['step']}, "
            f"{loss_text}), kept as it was")
    last = keeper.last
    if last is not None and not last["sane"]:
        worst = "non-finite" if last["max"] is None or not math.isfinite(last["max"]) else f"{last['max']:.4g}"
        text += (f"; {keeper.folder / LATEST} (step {last['step']}, worst loss {worst}) had already "
                 "left the sane range")
    return text + (f". Resume from it with a lower learning rate: --set train.resume={sane['path']} "
                   "--set train.lr=<lower> (or lower model.nll_weight, which a resume takes only with "
                   "--set train.resume_mismatch=allow, or check the data).")


class ResumeMismatchError(CheckpointError):
    """The checkpoint to resume from was written with another model or objective; the message
    lists the differing keys (old → new) and how to start afresh or resume anyway."""


#: Config keys (a key, or a section/prefix ending in ".") that may differ between the run that
#: wrote a checkpoint and the run that resumes it: how long it runs, how often it logs,
#: checkpoints, samples and probes, where its files, data and weight files are (a resume takes
#: every weight from the checkpoint, the pretrained VAE's too), how it is launched and tracked,
#: its memory lever (micro-batch) and compilation, and the learning rates (the NaN guard's
#: recovery: resume the last sane checkpoint with a lower train.lr). Everything else defines the
#: model, the objective or the data order, and a change is a :class:`ResumeMismatchError`.
RESUMABLE_KEYS: tuple[str, ...] = (
    "study", "variant", "run_dir", "results_root",
    "data.root", "data.num_workers", "data.on_bad_file",
    "model.pretrained_vae", "model.lpips_backbone_weights_path", "model.repa_target_weights_path",
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_every",
    "train.sample_every", "train.fid_every", "train.fid_samples", "train.max_steps_this_run",
    "train.resume", "train.resume_mismatch", "train.compile", "train.micro_batch_size",
    "train.collapse_threshold", "train.collapse_min_active_fraction", "train.collapse_patience",
    "train.lr", "train.vae_lr", "train.disc_lr",
    "sample.", "eval.", "tracking.", "launcher.", "preflight.",
)


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted config ``key`` is one of :data:`RESUMABLE_KEYS`."""
    return any(key.startswith(k) if k.endswith(".") else key == k for k in RESUMABLE_KEYS)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: dict, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every model-/objective-defining key (not in
    :data:`RESUMABLE_KEYS`) whose value differs. A key the old config lacks (added to simflow
    after the checkpoint was written) counts as its default then; a key only the old config has
    (since removed) is ignored."""
    defaults = _flat(to_dict(Config()))
    was = _flat(old)
    now = _flat(to_dict(new))
    diffs = []
    for key, value in now.items():
        if may_change_on_resume(key):
            continue
        before = was.get(key, defaults.get(key))
        if before != value and not (isinstance(before, (int, float)) and isinstance(value, (int, float))
                                    and not isinstance(before, bool) and float(before) == float(value)):
            diffs.append((key, before, value))
    return diffs


def _shape_mismatches(saved: dict, model: nn.Module) -> list[str]:
    own = model.state_dict()
    out = [f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in saved.items()
           if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    out += [f"{k}: missing in the checkpoint" for k in own if k not in saved]
    out += [f"{k}: not in this model" for k in saved if k not in own]
    return out


def check_resume_early(cfg: Config) -> None:
    """The config check of :func:`check_resume_config` on the checkpoint a resume would try first,
    before a stage writes anything (its resolved config, its MLflow params): a mismatch is the same
    :class:`ResumeMismatchError`. The file is memory-mapped (only its config is read); one that
    cannot be read is left to :func:`load_resume_checkpoint`, which skips or names it."""
    path = find_resume_checkpoint(cfg)
    if path is None or cfg.train.resume_mismatch == "allow":
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: load_resume_checkpoint decides and says so
        return
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        _raise_on_differences(cfg, Path(path), ckpt["config"])


def _fresh_start_advice(path: Path) -> str:
    folder = Path(path).parent
    return (f"To train this configuration from scratch, keep the old run: move {folder} aside "
            f"(e.g. `mv {folder} {folder}.old`) or use another run folder (--set run_dir=<new "
            "folder>); train.resume=never would train into the same folder and replace its "
            "checkpoints.")


def _raise_on_differences(cfg: Config, path: Path, stored: dict) -> None:
    """:class:`ResumeMismatchError` for model-/objective-defining differences (unless
    ``train.resume_mismatch=allow``, where they are a warning)."""
    diffs = config_differences(stored, cfg)
    if not diffs:
        return
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
    if cfg.train.resume_mismatch != "allow":
        raise ResumeMismatchError(
            f"checkpoint {path} was written with another configuration ({listed}). Resuming "
            f"would continue another model or objective. {_fresh_start_advice(path)} To resume from "
            "it anyway, --set train.resume_mismatch=allow (the keys that may change on a resume "
            "without it: train.steps, the logging/checkpoint cadence, the learning rates and the "
            "others of simflow.checkpoints.RESUMABLE_KEYS, config/README.md).")
    warnings.warn(f"train.resume_mismatch=allow: resuming {path}, written with another "
                  f"configuration ({listed})", RuntimeWarning, stacklevel=3)


def check_resume_config(cfg: Config, path: Path, ckpt: dict, model: nn.Module) -> None:
    """Stop a resume of ``ckpt`` (read from ``path``) that would continue another model or
    objective: :class:`ResumeMismatchError` listing the differing keys old → new (see
    :data:`RESUMABLE_KEYS`), unless ``train.resume_mismatch=allow``, where the differences are a
    warning. A checkpoint written before checkpoints carried their config cannot be compared:
    said so in a warning, and resumed as before. Whatever the config says, weights whose shapes
    do not fit the model built now are an error (no resume can load them). Nothing is deleted."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        warnings.warn(f"checkpoint {path} carries no config (written by an older simflow): whether it "
                      "belongs to this configuration cannot be checked; resuming from it", RuntimeWarning,
                      stacklevel=2)
    else:
        _raise_on_differences(cfg, Path(path), stored)
    bad = _shape_mismatches(ckpt["model"], model)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ResumeMismatchError(f"checkpoint {path} holds weights of another architecture than this "
                                  f"configuration builds ({shown}); no resume can load them. "
                                  f"{_fresh_start_advice(path)}")
