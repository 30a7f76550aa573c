"""MLflow tracking for a study: one experiment, a parent run per study, a child run per variant.

Layout in the tracking store::

    experiment <experiment_name>
      run <study_name>                       parent, written to <study>/parent_run_id.txt
        run <variant>  (mlflow.parentRunId)  one per variant, written to <variant>/run_id.txt
          stage train  -> params, metrics, tags slurm_job_id.train, host.train, ...
          stage sample -> ...
          stage fid    -> ...

Every stage of a variant (possibly a different process, node or SLURM job, possibly a requeued
one) attaches to the variant's run through :class:`StageRun`; run ids travel between stages as
small text files so that Snakemake can order the rules on them.

Only global rank 0 of a job may call into this module: callers gate (``StageRun(enabled=rank ==
0)``). The default store is a SQLite file inside the results folder. SQLite is fine for a
handful of concurrent writers on one machine or a local disk; on NFS prefer an ``http://``
tracking server (``mlflow server --backend-store-uri sqlite:///...``) and point every job at it
with ``MLFLOW_TRACKING_URI`` or the configured URI.

Before any work the store is checked (:func:`check_tracking_store`, called by every stage at
start-up, by the workflow's onstart and by :func:`init_tracking_store`): a server that does not
answer fails in seconds, a file that is not an MLflow store is named and never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from simflow.contracts import PARENT_RUN_ID_FILE, RUN_ID_FILE, RUN_ID_PATTERN, TRACKING_DISABLED
from simflow.io import atomic_write

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MissingRunError",
    "RunNotInStoreError",
    "TRAINING_EXPERIMENT_KIND",
    "StageRun",
    "TrackingStoreError",
    "check_run_in_store",
    "check_tracking_store",
    "flatten",
    "init_study",
    "init_tracking_store",
    "init_stage_run",
    "init_variant_run",
    "log_run_outputs",
    "provenance_tags",
    "read_run_id",
    "resolve_tracking_uri",
    "runs_page_url",
    "set_run_status",
    "system_metrics_available",
    "tag_training_experiment",
    "write_run_id_file",
]

log = logging.getLogger(__name__)

# Quieten MLflow before it is first imported: no tqdm bars for artifact uploads in SLURM logs,
# no GitPython warning when git is missing on a compute node. setdefault keeps a user's choice.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# MLflow 3 sends usage telemetry to an external server; compute nodes are often offline, where
# each attempt waits on a timeout (about 2 s more per process exit). Opt out unless asked.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# System metrics of training runs (StageRun(system_metrics=True)): MLflow samples every 10 s by
# default; the demo's training runs last under a minute, so sample every 5 s unless told otherwise.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")

# MLflow 3's UI opens an experiment on the page of its kind, the tag mlflow.experimentKind: the
# GenAI page (traces, sessions) or, for this value, the model-training page (the runs table).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"

# Limits of MLflow's REST/SQL stores (mlflow/utils/validation.py in 3.17); its client splits a
# log_batch into batches of the store's size itself.
_MAX_PARAM_VALUE_LEN = 6000
_MAX_NOTE_LEN = 5000  # tag values: 8000 characters in 3.17; a run description is a tag

_SQLITE_PREFIX = "sqlite:///"

# URIs whose store this process has already initialised (init_tracking_store is idempotent but
# costs a lock plus a schema check; every public entry point calls it).
_initialised_uris: set[str] = set()
_init_guard = threading.Lock()


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str | float | int]:
    """Flatten a nested mapping into dotted keys, for MLflow params.

    ``{"model": {"depth": 8, "dims": [64, 128]}, "lr": 1e-4}`` becomes
    ``{"model.depth": 8, "model.dims": "[64, 128]", "lr": 0.0001}``. Lists and tuples, ``None``
    and any other non-scalar become their ``str``; bools stay bools (a subclass of int).
    """
    out: dict[str, str | float | int] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def resolve_tracking_uri(configured: str | None, results_dir: str | Path) -> str:
    """Pick the tracking URI: the configured value, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    file ``<results_dir>/mlflow.db`` (absolute).

    A relative SQLite path (``sqlite:///runs/mlflow.db``) is made absolute against the current
    directory, so that jobs started elsewhere (SLURM, submitit) reach the same file.
    """
    for candidate in (configured, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate is not None and str(candidate).strip():
            return _absolute_sqlite(str(candidate).strip())
    db = Path(results_dir).expanduser().resolve() / "mlflow.db"
    return f"{_SQLITE_PREFIX}{db}"


def _absolute_sqlite(uri: str) -> str:
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return f"{_SQLITE_PREFIX}{path.resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs`` is absolute), else None."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    rest = uri[len(_SQLITE_PREFIX):].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``lock_path`` (created if needed), held for the block.

    flock is per open file description, so it also serialises threads of one process that each
    open the file, and it is released by the kernel if the holder dies.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_run_id_file(path: str | Path, run_id: str | None) -> Path:
    """Write ``run_id`` (or, for None, the marker of a unit whose tracking is off) to the run-id
    file ``path``, atomically (a concurrent reader never sees half an id); returns the path."""
    text = (run_id or TRACKING_DISABLED) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_run_id(run_id_file: str | Path) -> str:
    """The run id stored in ``run_id_file`` (one line). Raises FileNotFoundError with a hint."""
    path = Path(run_id_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"MLflow run id file {path} does not exist: create the run first "
            "(simflow.tracking.init_study / init_variant_run, i.e. the workflow's mlflow init rules)"
        )
    run_id = path.read_text().strip()
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ValueError(
            f"MLflow run id file {path} holds {run_id!r}, not a 32-hex-digit run id; delete the file "
            "to create a new run"
        )
    return run_id


def _lock_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


class RunNotInStoreError(ValueError):
    """A run-id file names a run that the tracking store in use does not hold: the ids were
    written with another store. The message names the file, the run and the store, and the fix."""


def _require_run(client: Any, tracking_uri: str, run_id: str, run_id_file: Path,
                 fix: str | None = None) -> Any:
    """``client.get_run(run_id)``, or :class:`RunNotInStoreError` if the store does not hold it.

    Never replaced silently: a study's ids in a store other than the one they were made in would
    leave its runs split over two stores (and every later ``setup_unit`` failing there). ``fix``
    replaces the default advice (use the right store, or delete the file to start anew).
    """
    # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
    env = os.environ.get("MLFLOW_TRACKING_URI")
    source = (f"$MLFLOW_TRACKING_URI is set to {env!r} in this environment" if env
              else "tracking.tracking_uri, or $MLFLOW_TRACKING_URI, picks the store")
    if fix is None:
        fix = (f"Use the store that holds the run, or delete {run_id_file} to start a new run in "
               f"{tracking_uri}")
    raise RunNotInStoreError(
        f"{run_id_file} names MLflow run {run_id}, which the tracking store in use ({tracking_uri}) "
        f"does not hold: the id was written with another store ({source}). {fix}."
    ) from None


def check_run_in_store(tracking_uri: str, run_id_file: str | Path, fix: str | None = None) -> str:
    """The run id in ``run_id_file`` after checking that the store at ``tracking_uri`` holds the
    run; :class:`RunNotInStoreError` (naming file, run, store and ``fix``) otherwise. Reads only."""
    run_id_file = Path(run_id_file)
    run_id = read_run_id(run_id_file)
    init_tracking_store(tracking_uri)
    _require_run(_client(tracking_uri), tracking_uri, run_id, run_id_file, fix)
    return run_id


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding this package; (None, None) if not a checkout.

    Read from the package's own folder, not the cwd: Snakemake may run in another directory.
    ``git status --porcelain`` counts untracked, non-ignored files as dirty.
    """
    pkg_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=pkg_dir, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    # --no-optional-locks: never take .git/index.lock (a concurrent `git commit` would fail)
    status = git("--no-optional-locks", "status", "--porcelain")
    return commit.strip(), (None if status is None else bool(status.strip()))


def provenance_tags() -> dict[str, str]:
    """Tags that say where and from what code a process runs.

    ``host``; ``git_commit``, ``git_dirty`` and MLflow's own ``mlflow.source.git.commit`` when
    the package is a git checkout (left out otherwise); ``slurm_job_id`` when under SLURM.
    """
    tags = {"host": socket.gethostname()}
    commit, dirty = _git_state()
    if commit is not None:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def _job_id() -> str | None:
    """The scheduler's id of this job: SLURM's, else submitit-local's, else None."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


# --------------------------------------------------------------------------------------------
# store, study and variant runs
# --------------------------------------------------------------------------------------------
def _client(tracking_uri: str) -> Any:
    # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


class TrackingStoreError(ValueError):
    """The tracking store cannot be used: a server that does not answer, or a file that is not an
    MLflow store. The message names the URI or file and what to do."""


#: The probe of an ``http(s)://`` tracking server (:func:`check_tracking_store`): seconds per try
#: of ``GET <uri>/health``, tries, and the pause between them: an unreachable server is reported
#: after at most STORE_PROBE_TRIES * STORE_PROBE_TIMEOUT_S + STORE_PROBE_PAUSE_S seconds (11),
#: where MLflow's own client retries for minutes.
STORE_PROBE_TIMEOUT_S = 5.0
STORE_PROBE_TRIES = 2
STORE_PROBE_PAUSE_S = 1.0
#: Tables that every MLflow SQL store has (MLflow's alembic schema).
_MLFLOW_TABLES = {"alembic_version", "experiments"}

_STORE_FIXES = ("point tracking.tracking_uri (or $MLFLOW_TRACKING_URI) at a working store, or set "
                "tracking.enabled=false (--set tracking.enabled=false; in a study: tracking: {enabled: false})")


def check_tracking_store(tracking_uri: str) -> None:
    """Check, before any work, that the store at ``tracking_uri`` can be used; reads only.

    * ``http(s)://``: ``GET <uri>/health`` must answer within :data:`STORE_PROBE_TIMEOUT_S`
      seconds, in :data:`STORE_PROBE_TRIES` tries (a 401/403 counts as an answer: the server
      is there, the credentials are MLflow's business);
    * ``sqlite:///<file>``: a file that exists must be a SQLite database holding MLflow's tables
      (``alembic_version``, ``experiments``), checked through a read-only connection, so a file
      that is not an MLflow store is never modified, migrated or replaced. A missing file, an
      empty one, or a database without any table is a new store (MLflow creates the schema).

    Raises :class:`TrackingStoreError` naming the URI or file and what to do.
    """
    if tracking_uri.startswith(("http://", "https://")):
        _probe_server(tracking_uri)
        return
    db = _sqlite_path(tracking_uri)
    if db is not None:
        _check_sqlite_store(db, tracking_uri)


def _probe_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    reason = ""
    for attempt in range(STORE_PROBE_TRIES):
        if attempt:
            time.sleep(STORE_PROBE_PAUSE_S)
        try:
            with urllib.request.urlopen(url, timeout=STORE_PROBE_TIMEOUT_S) as response:
                if 200 <= response.status < 300:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return
            reason = f"HTTP {err.code} {err.reason}"
            if err.code < 500:  # an answer, but not an MLflow server's: trying again cannot help
                break
        except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out
            cause = getattr(err, "reason", err)
            reason = "no answer within the timeout" if isinstance(cause, (TimeoutError, socket.timeout)) \
                else f"{type(cause).__name__}: {cause}"
    raise TrackingStoreError(
        f"MLflow tracking server {uri} does not answer ({url}: {reason}; {STORE_PROBE_TRIES} tries of "
        f"{STORE_PROBE_TIMEOUT_S:g} s). Start the server (e.g. `mlflow server --backend-store-uri "
        f"sqlite:///<abs path>/mlflow.db --host <host> --port <port>`), or {_STORE_FIXES}.")


def _check_sqlite_store(db: Path, uri: str) -> None:
    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        return
    fix = ("It is left as it is. Point tracking.tracking_uri (or $MLFLOW_TRACKING_URI) at an MLflow "
           "store or at a new file (sqlite:///<abs path>/mlflow.db), move the file away if it is not "
           "needed, or set tracking.enabled=false")
    if not db.is_file():
        raise TrackingStoreError(f"tracking store {uri}: {db} is not a file. {fix}.")
    lock = db.with_name(db.name + ".lock")
    if lock.is_file():
        # Another process may be creating the schema (init_tracking_store holds this lock meanwhile;
        # a half-created store has some tables but not yet all): wait for it. Opened read-only, the
        # lock file is neither created nor written here.
        with open(lock) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    try:
        # mode=ro: never creates, writes or migrates anything (MLflow would create its schema in
        # any SQLite file it opens)
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=STORE_PROBE_TIMEOUT_S)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as err:
        raise TrackingStoreError(f"tracking store {uri}: {db} is not an MLflow store (not a readable "
                                 f"SQLite database: {err}). {fix}.") from None
    if tables and not _MLFLOW_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
        raise TrackingStoreError(f"tracking store {uri}: {db} is an SQLite database but not an MLflow "
                                 f"store (its tables: {shown}; an MLflow store has "
                                 f"{', '.join(sorted(_MLFLOW_TABLES))}). {fix}.")


def init_tracking_store(tracking_uri: str) -> None:
    """Create the store's schema once, before parallel jobs write to it.

    MLflow creates (and migrates) a SQLite schema on the first connection of every process; when
    several processes do that at once on a fresh file they race and corrupt it for good
    (``table _alembic_tmp_... already exists``). So the first connection is made under an
    exclusive file lock ``<db>.lock`` next to the database. For ``http(s)://`` and other URIs
    the server owns the schema and nothing is done. First the store is checked
    (:func:`check_tracking_store`: a server that does not answer, a file that is not an MLflow
    store, fail in seconds, nothing touched). Idempotent and cheap after the first call.
    """
    with _init_guard:
        if tracking_uri in _initialised_uris:
            return
        check_tracking_store(tracking_uri)
        db = _sqlite_path(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(db.with_name(db.name + ".lock")):
                # Any query opens the store, which creates/upgrades the schema and the Default
                # experiment; MLflow caches the store per URI for the rest of the process.
                _client(tracking_uri).search_experiments(max_results=1)
        elif tracking_uri.startswith(("file:", "/", ".", "~")):
            raise ValueError(
                f"tracking URI {tracking_uri!r} is a file store, which MLflow 3.17 refuses; use "
                "'sqlite:///<abs path>/mlflow.db' or an 'http://host:port' tracking server"
            )
        _initialised_uris.add(tracking_uri)


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """``<db folder>/mlartifacts/<experiment>`` for a SQLite store, so artifacts stay next to
    the results instead of ``./mlruns`` in whatever the cwd is; None (server default) otherwise."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("_") or "experiment"
    return (db.resolve().parent / "mlartifacts" / safe).as_uri()


def tag_training_experiment(client: Any, experiment: Any) -> None:
    """Tag ``experiment`` (an MLflow Experiment) as a model-training experiment, so that MLflow 3's
    UI opens it on its runs table rather than on the GenAI traces page. A kind already set (by a
    user, or by MLflow) is left alone."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)


def _get_or_create_experiment(client: Any, tracking_uri: str, name: str) -> str:
    # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} exists but is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another name"
            )
        tag_training_experiment(client, exp)  # experiments made before the tag existed
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}))
    except MlflowException:
        # Another process created it between our lookup and create (http store, no shared lock).
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        tag_training_experiment(client, exp)
        return str(exp.experiment_id)


class MissingRunError(RunNotInStoreError):
    """A run-id file names a run that its store does not hold (or holds deleted), where the caller
    asked not to replace it (:func:`init_study` with ``missing_run="error"``: the study's own
    parent run). The message says what happened to the run and how to go on."""


def _existing_run(client: Any, run_id_file: Path, known_run_id: str | None = None,
                  tracking_uri: str = "", missing_run: str = "replace") -> Any | None:
    """The live run named by ``run_id_file`` (or, when that file does not exist, by
    ``known_run_id``), or None if the file or the run is missing/deleted (a warning); with
    ``missing_run="error"`` a run that the file names but the store lacks or holds deleted is a
    :class:`MissingRunError` instead, and nothing is created."""
    # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
    from mlflow.exceptions import MlflowException

    in_file = run_id_file.is_file()
    run_id = run_id_file.read_text().strip() if in_file else (known_run_id or "")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
        what = "is deleted in" if run.info.lifecycle_stage == "deleted" else None
    except MlflowException:
        run, what = None, "is not in"
    if what is None:
        return run
    if missing_run == "error" and in_file:
        restore = (f" Restore it (MLFLOW_TRACKING_URI={tracking_uri} mlflow runs restore --run-id "
                   f"{run_id}) and rerun, or" if what == "is deleted in" else
                   " Use the store that holds it (tracking.tracking_uri / $MLFLOW_TRACKING_URI), or")
        raise MissingRunError(
            f"{run_id_file} names MLflow run {run_id}, which {what} the tracking store {tracking_uri}; "
            f"it is left as it is and no run was created.{restore} delete {run_id_file} and rerun to "
            "start this study's MLflow records afresh with a new parent run (the old run stays where "
            "it is).")
    log.warning("%s run %s, which %s the store %s: it is left as it is; creating a new run",
                f"run id file {run_id_file} names" if in_file else f"the last run of {run_id_file} was",
                run_id, what, tracking_uri)
    return None


def _str_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items() if v is not None}


def _create_run_once(tracking_uri: str, run_id_file: Path, create: Callable[[Any], Any],
                     known_run_id: str | None = None, missing_run: str = "replace") -> str:
    """Return the live run named by ``run_id_file`` (or by ``known_run_id`` when the file is
    missing), or make one with ``create(client)``.

    The one place where this package creates MLflow runs (:func:`init_study` and
    :func:`init_variant_run` only say what to create): the store is initialised, concurrent
    callers are serialised by a lock file next to ``run_id_file``, and a new run is ended as
    FINISHED (it is a container; a stage that logs into it reopens it) before its id is written
    atomically to ``run_id_file``.
    """
    init_tracking_store(tracking_uri)
    client = _client(tracking_uri)
    with _file_lock(_lock_for(run_id_file)):
        run = _existing_run(client, run_id_file, known_run_id, tracking_uri, missing_run)
        if run is None:
            run = create(client)
            client.set_terminated(run.info.run_id, status="FINISHED")
        if not run_id_file.is_file() or run_id_file.read_text().strip() != run.info.run_id:
            write_run_id_file(run_id_file, run.info.run_id)
        return str(run.info.run_id)


def init_study(
    tracking_uri: str,
    experiment_name: str,
    study_name: str,
    run_id_file: Path,
    tags: dict[str, Any] | None = None,
    missing_run: str = "replace",
    known_run_id: str | None = None,
) -> str:
    """Create (once) the experiment and the study's parent run; return the parent run id.

    Idempotent: if ``run_id_file`` names a live run it is reused (when the file is missing,
    ``known_run_id`` too, if the store holds it live). A run that the file names but the store
    lacks or holds deleted is replaced by a new run with a warning (``missing_run="replace"``,
    a stage's own parent run), or is a :class:`MissingRunError` saying what happened and how to
    go on, with nothing created (``"error"``: the study's parent run). Otherwise the experiment is
    created if needed (artifacts under ``<db folder>/mlartifacts``), a parent run named
    ``study_name`` with tag ``study`` (plus ``tags`` and :func:`provenance_tags`) is created and
    ended as FINISHED (it is a container; a stage that logs into it reopens it), and its id is
    written atomically to ``run_id_file``. Concurrent callers are serialised by a lock file
    next to ``run_id_file``.
    """

    def create(client: Any) -> Any:
        exp_id = _get_or_create_experiment(client, tracking_uri, experiment_name)
        all_tags = {**provenance_tags(), **_str_tags(tags), "study": study_name, "simflow.kind": "study"}
        run = client.create_run(exp_id, tags=all_tags, run_name=study_name)
        log.info("created MLflow study run %s (%s) in experiment %s", run.info.run_id, study_name,
                 experiment_name)
        return run

    if missing_run not in ("replace", "error"):
        raise ValueError(f"missing_run must be 'replace' or 'error', got {missing_run!r}")
    return _create_run_once(tracking_uri, Path(run_id_file), create, known_run_id, missing_run)


def init_variant_run(
    tracking_uri: str,
    experiment_name: str,
    parent_run_id_file: Path,
    run_name: str,
    run_id_file: Path,
    *,
    variant: str,
    tags: dict[str, Any] | None = None,
    known_run_id: str | None = None,
) -> str:
    """Create (once) the child run of a unit of ``variant`` under the study's parent run; return
    its id.

    Idempotent like :func:`init_study`; when ``run_id_file`` is missing, ``known_run_id`` (the
    unit's last run, see :func:`simflow.study.setup_unit`) is reused if the store still holds
    it. The child is named ``run_name`` (a unit's name: variant and seed), tagged
    ``mlflow.parentRunId`` (so the UI nests it), ``variant``, the parent's ``study``, ``tags`` and
    :func:`provenance_tags`, and lives in the parent's experiment, which must be ``experiment_name``.
    """
    # The study's parent run must be in this store: a mismatch is an error, not a new parent.
    parent_id = check_run_in_store(tracking_uri, parent_run_id_file, fix=(
        "Use the store the study was started with, or, to start the study's MLflow records afresh in "
        f"{tracking_uri}, delete {parent_run_id_file} and rerun (the workflow's mlflow_init rule "
        "writes a new parent run)"))

    def create(client: Any) -> Any:
        parent = client.get_run(parent_id)
        exp = client.get_experiment(parent.info.experiment_id)
        if exp.name != experiment_name:
            raise ValueError(
                f"parent run {parent_id} (from {parent_run_id_file}) belongs to experiment "
                f"{exp.name!r}, not {experiment_name!r}: delete {parent_run_id_file} to start a new "
                "study run, or fix the configured experiment name"
            )
        all_tags = {
            **provenance_tags(),
            **_str_tags(tags),
            "mlflow.parentRunId": parent_id,
            "variant": variant,
            "simflow.kind": "variant",
        }
        if "study" in parent.data.tags:
            all_tags.setdefault("study", parent.data.tags["study"])
        run = client.create_run(exp.experiment_id, tags=all_tags, run_name=run_name)
        log.info("created MLflow variant run %s (%s) under %s", run.info.run_id, run_name, parent_id)
        return run

    return _create_run_once(tracking_uri, Path(run_id_file), create, known_run_id)


def init_stage_run(tracking_uri: str, experiment_name: str, study_name: str, variant: str,
                   study_dir: str | Path, run_dir: str | Path) -> Path:
    """The run-id file of a stage run by hand, outside the workflow (its config names no
    ``tracking.run_id_file``): ``<run_dir>/mlflow_run_id.txt``, created with its run if missing.

    Such a stage is not part of the study, so it never writes the study's files: it files its
    run under the study's parent run when ``<study_dir>/mlflow_parent_run_id.txt`` names a run
    of the store in use (and fails, naming both, when it names a run of another store), and
    otherwise under a parent run of its own, kept in ``run_dir``.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_ID_FILE
    if path.exists():
        return path
    study_parent = Path(study_dir) / PARENT_RUN_ID_FILE
    try:
        has_study_run = bool(read_run_id(study_parent))
    except (FileNotFoundError, ValueError):  # no study yet, or one with tracking disabled
        has_study_run = False
    if has_study_run:
        parent = study_parent
        check_run_in_store(tracking_uri, parent, fix=(
            f"This stage is not part of study {study_name!r} (tracking.run_id_file is unset) and "
            "leaves its files alone: run it against the study's store (tracking.tracking_uri / "
            "$MLFLOW_TRACKING_URI), or keep it out of the study with --set study=<another "
            "name> (or --set tracking.enabled=false)"))
    else:
        parent = run_dir / PARENT_RUN_ID_FILE
        init_study(tracking_uri, experiment_name, study_name, parent)
    init_variant_run(tracking_uri, experiment_name, parent, variant, path, variant=variant)
    return path



# --------------------------------------------------------------------------------------------
# the study's parent run over the study's lifetime
# --------------------------------------------------------------------------------------------
_RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


def _open_marked_run(tracking_uri: str, run_id_file: str | Path) -> tuple[str, Any] | None:
    """(run id, client) of the run named by ``run_id_file``, or None when the file does not exist
    or holds no run id (tracking disabled: a marker)."""
    path = Path(run_id_file)
    if not path.is_file() or not re.fullmatch(RUN_ID_PATTERN, path.read_text().strip()):
        return None
    init_tracking_store(tracking_uri)
    return read_run_id(path), _client(tracking_uri)


def set_run_status(tracking_uri: str, run_id_file: Path, status: str) -> str | None:
    """Set the status of the run named by ``run_id_file``; return its id, or None when the file
    does not exist or holds no run id (tracking disabled: a marker).

    ``RUNNING`` reopens the run (the workflow marks the study's parent run RUNNING when a
    ``snakemake`` invocation starts work); ``FINISHED``, ``FAILED`` and ``KILLED`` end it now. The
    start time is never changed: the parent run starts with the study's first invocation and ends
    with its latest one. (MLflow keeps a reopened run's previous end time until it ends again.)"""
    if status not in _RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(_RUN_STATUSES)}, got {status!r}")
    opened = _open_marked_run(tracking_uri, run_id_file)
    if opened is None:
        return None
    run_id, client = opened
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)
    return run_id


def log_run_outputs(
    tracking_uri: str,
    run_id_file: Path,
    artifacts: Mapping[str, Sequence[str | Path]] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str | None:
    """Log a finished study's outputs into its run (the parent run): ``artifacts`` maps an
    artifact folder ("" for the top) to files copied there (missing files are skipped and a
    file logged again replaces the old copy), ``metrics`` are logged at step 0 (non-finite values
    skipped), ``tags`` set, and ``description`` becomes the run's description in the UI (the
    ``mlflow.note.content`` tag, Markdown). Returns the run id, or None when ``run_id_file`` names
    no run (tracking disabled)."""
    # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
    from mlflow.entities import Metric, RunTag

    opened = _open_marked_run(tracking_uri, run_id_file)
    if opened is None:
        return None
    run_id, client = opened
    for folder, files in (artifacts or {}).items():
        for file in files:
            if Path(file).is_file():
                client.log_artifact(run_id, str(file), folder or None)
    now_ms = int(time.time() * 1000)
    batch = [Metric(k, float(v), now_ms, 0) for k, v in (metrics or {}).items()
             if v is not None and math.isfinite(float(v))]
    client.log_batch(run_id, metrics=batch)  # MLflow's client splits a batch to its store's limits
    all_tags = _str_tags(tags)
    if description is not None:
        all_tags["mlflow.note.content"] = description[:_MAX_NOTE_LEN]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
    return run_id


def runs_page_url(tracking_uri: str, experiment_name: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's link to the runs table of ``experiment_name`` (the experiments list when it
    does not exist yet). ``workflowType=machine_learning`` selects MLflow 3's "Model training"
    view: since MLflow 3.1x the UI picks its GenAI or model-training view from a per-browser
    switch (default GenAI) rather than from the experiment's ``mlflow.experimentKind`` tag."""
    base = f"http://{host}:{port}/#/experiments"
    exp_id = None
    db = _sqlite_path(tracking_uri)
    if db is None or db.is_file():  # never create an empty SQLite store just to look
        exp = _client(tracking_uri).get_experiment_by_name(experiment_name)
        if exp is not None and exp.lifecycle_stage != "deleted":
            exp_id = exp.experiment_id
    return f"{base}/{exp_id}?workflowType=machine_learning" if exp_id else f"{base}?workflowType=machine_learning"


def system_metrics_available() -> bool:
    """Whether MLflow's system-metrics logging can run here: it needs psutil (CPU, memory, disk,
    network); GPU utilisation and memory are added when nvidia-ml-py (pynvml) finds a GPU."""
    return importlib.util.find_spec("psutil") is not None


def _system_metrics_opted_out() -> bool:
    value = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


# --------------------------------------------------------------------------------------------
# a stage attached to a run
# --------------------------------------------------------------------------------------------
class _SignalKill(SystemExit):
    """Raised by StageRun's SIGTERM handler: ends the run as KILLED, exits with 128 + signum."""


class StageRun:
    """Attach one stage (``train``, ``sample``, ``fid`` ...) of a variant to its MLflow run.

    ``with StageRun(uri, run_id_file, "train", enabled=rank == 0) as tr: tr.log_metrics(...)``.

    On enter the run named by ``run_id_file`` is reopened (``mlflow.start_run(run_id=...)``, so
    fluent ``mlflow.log_*`` calls also land in it) and tagged with ``stage``,
    ``slurm_job_id.<stage>`` / ``job_id.<stage>``, ``host.<stage>`` and :func:`provenance_tags`.
    A SIGTERM handler (main thread only) turns ``scancel``/the time limit into a KILLED run and
    exit status 143. On exit the run ends FINISHED on success, FAILED on an exception, KILLED on
    KeyboardInterrupt or a signal (SIGTERM, or submitit's requeue exit after a timeout or
    preemption; the requeued job reopens the run). The previous SIGTERM handler is restored.

    Metrics: ``log_metrics({"loss": 0.3}, step)`` logs floats at an integer step (use the global
    optimiser step so a resumed run lines up); non-finite values are skipped with a warning.
    With ``enabled=False`` (ranks > 0, tracking switched off) every method is a no-op and
    nothing is read or written.

    ``system_metrics=True`` (the training stages) also logs MLflow's system metrics into the run
    while the stage runs (``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``,
    disk and network; ``system/gpu_*`` when nvidia-ml-py finds a GPU), every
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (5 unless set), when psutil is installed
    and ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is not ``false``. A requeued or resumed stage
    continues the steps of the earlier samples.
    """

    def __init__(self, tracking_uri: str, run_id_file: Path, stage: str, enabled: bool = True,
                 system_metrics: bool = False) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage):
            raise ValueError(f"stage name {stage!r} must be letters, digits, '_', '.' or '-' (it becomes a tag key)")
        self.tracking_uri = tracking_uri
        self.run_id_file = Path(run_id_file)
        self.stage = stage
        self.enabled = enabled
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._client: Any = None
        self._old_handler: Any = None
        self._handler_installed = False
        self._signalled: int | None = None
        self._started_active = False
        self._env_uri: str | None = None

    # -- context management ------------------------------------------------------------------
    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
        import mlflow

        run_id = read_run_id(self.run_id_file)
        init_tracking_store(self.tracking_uri)
        self._client = _client(self.tracking_uri)
        _require_run(self._client, self.tracking_uri, run_id, self.run_id_file)
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to os.environ; left there, it
        # would redirect every later stage of this process (and its subprocesses) into this store
        # (resolve_tracking_uri honours the variable). Restored in __exit__.
        self._env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            # The caller already has this run open (its own start_run): log into it, but leave
            # opening and ending it to the caller.
            self._started_active = False
        else:
            wanted = self.system_metrics and not _system_metrics_opted_out()
            if wanted and not system_metrics_available():
                log.info("MLflow system metrics not logged: psutil is not installed")
                wanted = False
            mlflow.start_run(run_id=run_id, nested=active is not None,
                             log_system_metrics=True if wanted else None)
            self._started_active = True
        self.run_id = run_id
        tags = {**provenance_tags(), "stage": self.stage, f"host.{self.stage}": socket.gethostname()}
        job_id = _job_id()
        if job_id is not None:
            tags[f"job_id.{self.stage}"] = job_id
        if os.environ.get("SLURM_JOB_ID"):
            tags[f"slurm_job_id.{self.stage}"] = os.environ["SLURM_JOB_ID"]
        try:
            self.set_tags(tags)
        except BaseException:
            if self._started_active:  # do not leave the run RUNNING and attached
                mlflow.end_run(status="FAILED")
            self.run_id = None
            self._restore_env_uri()
            raise
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handler_installed = True
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # End the run from __exit__, in ordinary control flow, not from inside the handler:
        # the interrupted code may be in the middle of an SQLite write of its own.
        self._signalled = signum
        raise _SignalKill(128 + signum)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if not self.enabled or self.run_id is None:
            return False
        if self._handler_installed:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._handler_installed = False
        status = self._status_for(exc)
        # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
        import mlflow

        try:
            if self._started_active:
                mlflow.end_run(status=status)
        except Exception:  # never mask the stage's own exception with a tracking error
            log.exception("could not end MLflow run %s as %s", self.run_id, status)
            if exc is None:
                raise
        finally:
            self._restore_env_uri()
        return False

    def _restore_env_uri(self) -> None:
        if self._env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._env_uri

    def _status_for(self, exc: BaseException | None) -> str:
        if exc is None:
            return "FINISHED"
        if isinstance(exc, KeyboardInterrupt) or self._signalled is not None:
            return "KILLED"
        if isinstance(exc, SystemExit):
            if exc.code in (0, None):
                return "FINISHED"
            # submitit exits with -1 right after requeueing a timed-out/preempted job (USR2)
            if exc.code == -1 and os.environ.get("SUBMITIT_EXECUTOR"):
                return "KILLED"
        return "FAILED"

    # -- logging ---------------------------------------------------------------------------------
    def _check_attached(self) -> bool:
        if not self.enabled:
            return False
        if self.run_id is None:
            raise RuntimeError("StageRun is not entered: use it as `with StageRun(...) as tr:`")
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run (values made strings; None values skipped)."""
        if not self._check_attached():
            return
        # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _str_tags(tags).items()])

    def log_params_once(self, params: Mapping[str, Any]) -> None:
        """Log ``flatten(params)``, skipping keys the run already has (a requeued or later stage
        re-logging the same config). A key present with a *different* value is an error: the
        run would describe two configurations."""
        if not self._check_attached():
            return
        # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        new: list[Param] = []
        conflicts = []
        for key, value in flatten(params).items():
            text = str(value)[:_MAX_PARAM_VALUE_LEN]
            if key in existing:
                if existing[key] != text:
                    conflicts.append(f"{key}: run has {existing[key]!r}, now {text!r}")
                continue
            new.append(Param(key, text))
        if conflicts:
            raise ValueError(
                f"MLflow run {self.run_id} ({self.run_id_file}) already holds different values for "
                "these params (MLflow params are immutable): " + "; ".join(conflicts)
                + f". Delete {self.run_id_file} to track this configuration in a new run, or "
                "restore the old values."
            )
        self._client.log_batch(self.run_id, params=new)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log the finite values of ``metrics`` at ``step`` (0 if None) in one batch."""
        if not self._check_attached():
            return
        # lazy: mlflow costs ~1.8 CPU-s; the CLI, the submit path and the Snakefile import this module
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            v = float(value)
            if not math.isfinite(v):
                # no step in the text: Python shows a given warning once per call site, not per step
                warnings.warn(f"MLflow: not logging non-finite values of metric {key!r} (got {v})",
                              RuntimeWarning, stacklevel=2)
                continue
            batch.append(Metric(key, v, now_ms, int(step or 0)))
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file or folder ``path`` into the run's artifacts (under ``artifact_path``)."""
        if not self._check_attached():
            return
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """Store ``d`` as the artifact ``name`` (JSON, or YAML for a .yaml/.yml name)."""
        if not self._check_attached():
            return
        self._client.log_dict(self.run_id, dict(d), name)
