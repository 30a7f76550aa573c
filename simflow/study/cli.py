"""``python -m simflow.study``: what the workflow's rules and the docs call::

    python -m simflow.study check config/demo.yaml [...]   # validate, list variants and units
    python -m simflow.study init-study --study demo --results-root results --out F [--running]
    python -m simflow.study run-status RUNNING|FINISHED|FAILED --results-root results --run-id-file F
    python -m simflow.study setup-unit --unit U --config JSON --out-config F --out-run-id F --parent F
    python -m simflow.study schema > workflow/schemas/config.schema.yaml
    python -m simflow.study keys                            # Markdown table of the stage keys
    python -m simflow.study flops config/demo.yaml config/claims.yaml [--match V=REF]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from simflow.config import ConfigError, LauncherSection, deep_merge, read_yaml
from simflow.study.loading import load_study
from simflow.study.schema import keys_markdown, study_schema
from simflow.study.spec import StudyError, get_key
from simflow.study.units import pipeline_configs, unit_run_name, variant_unit
from simflow.study.unit_folder import init_study_tracking, set_study_run_status, setup_unit

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simflow.study",
        description="Check study configs, set up their MLflow runs, print their schema and keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate study configs; list their variants and units")
    p.add_argument("configs", nargs="+")
    p.add_argument("--merged", action="store_true",
                   help="the files are one study, merged in order as Snakemake's --configfile "
                   "merges them (a study and its overlays)")
    p = sub.add_parser("init-study", help="create the MLflow store, experiment and parent run")
    p.add_argument("--study", required=True)
    p.add_argument("--results-root", required=True)
    p.add_argument("--out", required=True, help="file receiving the parent run id")
    p.add_argument("--experiment", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--disabled", action="store_true", help="tracking off: write a marker only")
    p.add_argument("--running", action="store_true",
                   help="leave the parent run RUNNING (the workflow ends it when the invocation ends)")
    p = sub.add_parser("run-status", help="set the status of the study's parent run")
    p.add_argument("status", choices=["RUNNING", "FINISHED", "FAILED", "KILLED"])
    p.add_argument("--results-root", required=True)
    p.add_argument("--run-id-file", required=True, help="the parent run id file")
    p.add_argument("--tracking-uri", default=None)
    p = sub.add_parser("setup-unit", help="write a unit's resolved config and create (or reuse) its "
                       "MLflow child run (the workflow's rule setup_unit)")
    p.add_argument("--unit", required=True, help="the unit, e.g. simflow/s0 or _shared/fid_ref")
    p.add_argument("--config", required=True, type=_json_object,
                   help="the unit's explicit config, a JSON object")
    p.add_argument("--out-config", required=True, help="the resolved config file to write")
    p.add_argument("--out-run-id", required=True, help="file receiving the unit's MLflow run id")
    p.add_argument("--parent", required=True, help="the study's parent run id file")
    p.add_argument("--tags", type=_json_object, default={}, help="MLflow tags of the run, a JSON object")
    sub.add_parser("schema", help="print the study config's JSON schema (YAML)")
    p = sub.add_parser("keys", help="print a Markdown table of the stage (or launcher) config keys")
    p.add_argument("--launcher", action="store_true", help="the launcher keys instead")
    p = sub.add_parser("flops", help="counted training FLOPs of each variant's pipeline (VAE "
                       "pre-training included) and compute-matched step counts (simflow.flops)")
    p.add_argument("configs", nargs="+", help="study config files, merged in order as Snakemake's "
                   "--configfile merges them")
    p.add_argument("--match", action="append", default=[], metavar="VARIANT=REFERENCE",
                   help="print the train.steps at which VARIANT's pipeline costs REFERENCE's")
    args = parser.parse_args(argv)

    if args.command == "check":
        if args.merged:
            try:
                study = load_study(_merged(args.configs))
            except (StudyError, ConfigError) as err:
                print(err, file=sys.stderr)  # a file's syntax error names it (file:line:column: ...)
                return 2
            print(f"{' + '.join(args.configs)}: study {study.name}: {len(study.variants)} variants x "
                  f"{len(study.seeds)} seed(s); units: {', '.join(study.units)}")
            return 0
        status = 0
        for path in args.configs:
            try:
                study = load_study(path)
            except StudyError as err:
                # a syntax error already starts with the file name (file:line:column: ...)
                print(err if str(err).startswith(str(path)) else f"{path}: {err}", file=sys.stderr)
                status = 2
                continue
            print(f"{path}: study {study.name}: {len(study.variants)} variants x "
                  f"{len(study.seeds)} seed(s); units: {', '.join(study.units)}")
        return status
    if args.command == "init-study":
        try:
            run_id = init_study_tracking(args.study, args.results_root, args.out,
                                         experiment=args.experiment, tracking_uri=args.tracking_uri,
                                         enabled=not args.disabled)
            if run_id and args.running:
                set_study_run_status("RUNNING", args.results_root, args.out, tracking_uri=args.tracking_uri)
        except ValueError as err:  # the store cannot be used, or the parent run is missing
            print(f"python -m simflow.study init-study: error: {err}", file=sys.stderr)
            return 2
        print(f"study {args.study}: parent run {run_id or '(tracking disabled)'} -> {args.out}")
        return 0
    if args.command == "run-status":
        try:
            run_id = set_study_run_status(args.status, args.results_root, args.run_id_file,
                                          tracking_uri=args.tracking_uri)
        except ValueError as err:
            print(f"python -m simflow.study run-status: error: {err}", file=sys.stderr)
            return 2
        print(f"parent run {run_id}: {args.status}" if run_id else
              f"no MLflow run in {args.run_id_file} (not created yet, or tracking disabled)")
        return 0
    if args.command == "setup-unit":
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)  # MLflow's messages, into the log
        try:
            run_id = setup_unit(args.config, args.out_config, args.out_run_id, args.parent,
                                run_name=unit_run_name(args.unit), tags=args.tags)
        except ValueError as err:  # an invalid config, a store that cannot be used, a missing run
            print(f"python -m simflow.study setup-unit: error: {args.unit}: {err}", file=sys.stderr)
            return 2
        print(f"{args.unit}: config {args.out_config}, MLflow run {run_id}")
        return 0
    if args.command == "schema":
        sys.stdout.write("# Generated by `python -m simflow.study schema`; do not edit by hand.\n")
        sys.stdout.write(yaml.safe_dump(study_schema(), sort_keys=False, allow_unicode=True))
        return 0
    if args.command == "flops":
        return print_flops(args.configs, args.match)
    sys.stdout.write(keys_markdown(LauncherSection, "launcher.", ()) if args.launcher else keys_markdown())
    return 0


def print_flops(configs: Sequence[str], matches: Sequence[str]) -> int:
    """The ``flops`` command: a Markdown table of every variant's counted pipeline FLOPs, then
    one line per ``VARIANT=REFERENCE`` match."""
    # lazy: flops loads torch (~2 CPU-s); only this command needs it, not the Snakefile's imports
    from simflow.flops import matched_steps, pipeline_flops

    try:
        study = load_study(_merged(configs))
        pairs = [m.split("=", 1) for m in matches]
        for pair in pairs:
            if len(pair) != 2 or not all(v in study.variants for v in pair):
                raise StudyError(f"--match {'='.join(pair)}: give VARIANT=REFERENCE, two of the study's "
                                 f"variants ({', '.join(study.variants)})")
    except (StudyError, ConfigError) as err:
        print(err, file=sys.stderr)
        return 2
    print("| variant | train.steps | train PFLOP | VAE pre-training PFLOP | total PFLOP |")
    print("|---|---|---|---|---|")
    counted: dict[str, dict[str, float]] = {}
    for variant in study.variants:
        steps = get_key(study.units[variant_unit(variant, study.seeds[0])], "train.steps")
        try:
            counted[variant] = flops = pipeline_flops(*pipeline_configs(study, variant))
        except FileNotFoundError as err:  # e.g. a REPA target that an earlier stage writes
            print(f"| {variant} | {steps} | not counted: {err} | | |")
            continue
        print(f"| {variant} | {steps} | {flops['train'] / 1e15:.4g} | {flops['pretrain_vae'] / 1e15:.4g} "
              f"| {flops['total'] / 1e15:.4g} |")
    status = 0
    for variant, reference in pairs:
        if variant not in counted or reference not in counted:
            print(f"--match {variant}={reference}: not counted (above)", file=sys.stderr)
            status = 2
            continue
        cfg = pipeline_configs(study, variant)[0]
        step = counted[variant]["train"] / cfg.train.steps  # the counted FLOPs of one step
        print(f"{variant} at the FLOPs of {reference}: train.steps = "
              f"{matched_steps(step, counted[reference]['total'])}")
    return status


def _json_object(text: str) -> dict[str, Any]:
    """An argument holding a JSON object (argparse turns the error into one usage line, exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text[:80]!r}")
    return value


def _merged(configs: Sequence[str]) -> dict:
    """Study config files read strictly (a syntax error or a duplicated key names file and line)
    and merged in order, as Snakemake merges its --configfile arguments."""
    raw: dict = {}
    for path in configs:
        raw = deep_merge(raw, read_yaml(path, "study config") or {})
    return raw
