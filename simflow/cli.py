"""``simflow <stage> --config FILE [--set key.path=value ...]`` and the helper commands.

Exit status: 0 on success, 2 for a problem with the input (config, dataset, missing upstream
file, unreadable checkpoint, tracking store) or a full disk, 3 for a non-finite loss, 1 for a
failed or cancelled job. ``simflow preflight`` exits 0 whatever it finds (its findings are the row
it writes), 2 for an invalid config.

Building the parser imports neither torch nor MLflow (the stage names come from
:mod:`simflow.contracts`; ``simflow bench`` loads its options only when it runs), and neither
does a stage submitted to a launcher: only the job that runs the stage loads them. Inside the
workflow a stage with the local launcher is handed to the stage server, which has them loaded
(:data:`simflow.stage_client.SERVER_ENV`, :mod:`simflow.stage_server`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from simflow.contracts import STAGES
from simflow.io import DiskFullError, disk_full_cause
from simflow.stage_client import SERVER_ENV, run_through_server

STAGE_HELP = {
    "preflight": "rehearse a training stage for a few steps and check what the real stages need "
                 "(writes <unit>/preflight/preflight.json; a failure is a red row, not an error)",
    "feature-extractor": "train the demo's small classifier used as the FID feature extractor",
    "fid-ref": "compute FID reference statistics once",
    "fid-floor": "the real-vs-real FID/KID floor: real test images against the reference, at the samples' count",
    "pretrain-vae": "train the learnable-variance VAE used by the frozen variants",
    "train": "train one variant (resumes from its latest checkpoint)",
    "sample": "generate samples (npz in the ADM evaluator's format + PNG grid)",
    "fid": "FID/IS(/KID/PR) of the samples with torch-fidelity",
    "guidance": "samples and gFID against the CFG weight (eval.guidance_weights), from the trained model",
    "reconstruct": "rFID, PSNR and reconstruction under latent noise (Figure 3a/3b)",
    "nll": "test-set bits/dim and the flow's Bayes-classifier accuracy (argmin over classes of the NLL)",
    "latents": "encode a validation set and save the latent maps",
}
BENCH_HELP = "benchmark training and sampling throughput (`simflow bench --help` lists its options)"


def build_parser() -> argparse.ArgumentParser:
    """The ``simflow`` parser: every stage, ``config``, ``ui`` and ``bench`` (whose own options
    are parsed by :func:`bench_parser`, which imports torch)."""
    parser = argparse.ArgumentParser(prog="simflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for stage in STAGES:
        p = sub.add_parser(stage, help=STAGE_HELP[stage])
        p.add_argument("--config", "-c", help="stage config YAML (defaults for every missing key)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    cfg = sub.add_parser("config", help="show the options, the JSON schema, or a resolved config")
    cfg.add_argument("action", choices=["describe", "schema", "resolve"])
    cfg.add_argument("--config", "-c")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ui = sub.add_parser("ui", help="start the MLflow UI on a study's store, printing the link to its runs")
    ui.add_argument("--study", default="demo", help="the study (its MLflow experiment; default demo)")
    ui.add_argument("--experiment", help="the experiment name, when the study config names another one")
    ui.add_argument("--results-root", default="results", help="holds mlflow.db (default results)")
    ui.add_argument("--tracking-uri", help="the store (default: $MLFLOW_TRACKING_URI, else <results-root>/mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--print-url", action="store_true", help="only print the link, do not start the UI")
    sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    return parser


def bench_parser() -> argparse.ArgumentParser:
    """The parser of ``simflow bench``'s options (imports :mod:`simflow.bench`, and so torch)."""
    # lazy: simflow.bench loads torch (~2 s); only `simflow bench` needs it
    from simflow import bench

    parser = argparse.ArgumentParser(prog="simflow bench", description=BENCH_HELP.split(" (")[0])
    bench.add_arguments(parser)
    return parser


def config_command(args: argparse.Namespace) -> int:
    # lazy: config and yaml cost ~50 ms, which `simflow --help` and `simflow ui` skip
    import yaml
    from simflow.config import describe, json_schema, load_config, to_dict
    if args.action == "describe":
        for key, type_name, default, text in describe():
            print(f"{key} ({type_name}, default {default!r}): {text}")
    elif args.action == "schema":
        print(json.dumps(json_schema(), indent=2))
    else:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def ui_command(args: argparse.Namespace) -> int:
    """Print the link to the study's runs table, then run ``mlflow ui`` on its store."""
    # lazy: tracking costs ~40 ms; only this command needs it
    from simflow.tracking import resolve_tracking_uri, runs_page_url

    uri = resolve_tracking_uri(args.tracking_uri, args.results_root)
    url = runs_page_url(uri, args.experiment or args.study, args.host, args.port)
    print(f"MLflow UI of study {args.study!r} (store {uri}): {url}", flush=True)
    if args.print_url:
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, cmd)
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # lazy: simflow.bench loads torch (~2 s); only `simflow bench` needs it
        from simflow import bench
        bench_args = bench_parser().parse_args(argv[1:])
        return guarded("bench", lambda: bench.main(bench_args))
    args = build_parser().parse_args(argv)
    if args.command == "ui":
        return ui_command(args)
    if args.command == "config":
        return guarded(args.command, lambda: config_command(args))
    server = stage_server_socket(args)
    if server is not None:
        status = run_through_server(server, argv)
        if status is not None:
            return status
    if args.command == "preflight":
        # lazy: the runner (~0.15 s) loads only for the command that runs a stage
        from simflow.runner import run_preflight
        return guarded("preflight", lambda: run_preflight(args.config, args.overrides))
    # lazy: the runner (~0.15 s) loads only for the command that runs a stage
    from simflow.runner import run_stage
    return guarded(args.command, lambda: (run_stage(args.command, args.config, args.overrides), 0)[1])


def stage_server_socket(args: argparse.Namespace) -> str | None:
    """The stage server's socket when this stage should run there: the workflow named one
    (:data:`SERVER_ENV`) and the stage's launcher is local (a submitting stage imports little
    and waits; its job runs elsewhere). A config that does not load runs here, where it fails
    with its own error before anything is imported."""
    # lazy: config and yaml cost ~50 ms, which `simflow --help` and `simflow ui` skip
    from simflow.config import ConfigError, load_config

    socket_path = os.environ.get(SERVER_ENV)
    if not socket_path or args.command not in STAGES:
        return None
    try:
        backend = load_config(args.config, args.overrides).launcher.backend
    except (ConfigError, OSError, ValueError):
        return None
    return socket_path if backend == "local" else None


def _raised_as(err: BaseException, module: str, name: str) -> bool:
    """Whether ``err`` is an instance of ``module.name``, without importing ``module``: an
    exception class of a module that was never imported cannot have been raised, and importing
    simflow.train or simflow.data here would load torch into every submitting process."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(err, getattr(loaded, name))


def guarded(command: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; known failures become one line on stderr and an exit status."""
    # lazy: config and yaml cost ~50 ms, which `simflow --help` and `simflow ui` skip
    from simflow.config import ConfigError
    try:
        return fn()
    except Exception as err:
        if (isinstance(err, (ConfigError, FileNotFoundError, ValueError, DiskFullError))
                or _raised_as(err, "simflow.data", "DatasetNotFoundError")):
            status = 2
        elif _raised_as(err, "simflow.checkpoints", "NonFiniteLossError"):
            status = 3
        elif _raised_as(err, "simflow.launch", "LaunchError"):
            status = 1
        else:
            # A full disk met outside simflow.io's writers (e.g. MLflow's SQLite store): one line.
            cause = disk_full_cause(err)
            if cause is None:
                raise
            print(f"simflow {command}: error: no space left on the device while running this stage "
                  f"({type(cause).__name__}: {cause}); free some space and rerun", file=sys.stderr)
            return 2
        print(f"simflow {command}: error: {err}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
