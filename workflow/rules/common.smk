# Helpers shared by the *.smk files: the validated study, paths, input functions and params.
# No rules here (Snakemake's lint: functions and rules live in separate files).
import json
import os
import re
import shlex
import subprocess
import sys

from snakemake.logging import logger

from simflow import study as sf
from simflow.contracts import CONFIG_FILE, RUN_ID_FILE, SHARED_UNITS, STAGE_FILES
from simflow.stage_client import SERVER_ENV
from simflow.stage_server import StageServer

# The whole study config is validated here, at parse time: an invalid variant fails the run
# before any job starts, with a message naming the variant and the key. Snakemake read the config
# files itself, keeping the last of a duplicated key: they are read again strictly first.
sf.check_config_files(workflow.configfiles)
STUDY = sf.load_study(config)

# Snakemake takes `--config` from the command line *instead of* a profile's `config:` (per
# option, not per key), so `snakemake --profile slurm --config x=1` silently runs locally.
if sf.profile_config_dropped(sys.argv, config):
    logger.warning(
        "--profile was given together with --config: the profile's `config:` entries (e.g. "
        "launcher_backend: slurm) are replaced by the command line's. Repeat them after --config "
        "(e.g. --config launcher_backend=slurm ...) or set them in the study config."
    )

SD = STUDY.dir  # results/<study>
LOGS = f"{SD}/logs"
VDIR = f"{SD}/{{variant}}/s{{seed}}"  # one variant trained with one seed
VLOG = f"{LOGS}/{{variant}}/s{{seed}}"
CLASSIFIER_DIR = f"{SD}/{SHARED_UNITS['feature-extractor']}"
FIDREF_DIR = f"{SD}/{SHARED_UNITS['fid-ref']}"
FIDFLOOR_DIR = f"{SD}/{SHARED_UNITS['fid-floor']}"
PRETRAIN_DIR = f"{SD}/{SHARED_UNITS['pretrain-vae']}/s{{seed}}"
# One software environment for every rule: the simflow package and its dependencies.
ENV = "../envs/simflow.yaml"


def _alternation(names):
    """A regex matching exactly the given names (wildcards must not match anything else)."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


VARIANT_RE = _alternation(STUDY.variants)
UNIT_RE = _alternation(STUDY.units)


# Wildcards match only configured names (a '.' in simflow_sigma0.1 is then harmless), so no
# pattern can swallow another rule's path.
wildcard_constraints:
    variant=VARIANT_RE,
    seed=r"\d+",
    unit=UNIT_RE,


def stage_cmd(stage):
    """Params value: the command running ``stage`` (untracked: see simflow.study.Untracked)."""
    return sf.Untracked(sf.stage_command(STUDY, stage))


def launcher_args(stage):
    """Params value: ``--set launcher.<key>=<value>`` for ``stage`` (untracked)."""
    return sf.Untracked(" ".join(f"--set {shlex.quote(s)}" for s in sf.launcher_sets(STUDY, stage)))


def preflight_launcher_args(wildcards):
    """Params value of a rehearsal: its launcher, from the rehearsed stage's (untracked)."""
    return sf.Untracked(" ".join(f"--set {shlex.quote(s)}" for s in sf.preflight_launcher_sets(STUDY, wildcards.unit)))


def preflight_args(wildcards):
    """Params value of a rehearsal: what it rehearses (steps, real world size, CPU overrides).
    Tracked: changing the study's `preflight:` section re-runs the rehearsals."""
    return " ".join(f"--set {shlex.quote(s)}" for s in sf.preflight_sets(STUDY, wildcards.unit))


def stage_params(stage):
    """A stage rule's params: the command running ``stage`` and its launcher arguments."""
    return {"cmd": stage_cmd(stage), "launcher": launcher_args(stage)}


def threads_of(stage):
    return sf.stage_threads(STUDY, stage)


def stage_outputs(stage, folder):
    """The final files of ``stage`` in ``folder``, by output name (simflow.contracts.STAGE_FILES):
    a rule's ``output: **stage_outputs(...)``."""
    return {name: f"{folder}/{file}" for name, file in STAGE_FILES[stage].items()}


def stage_file(stage, name, folder):
    """One final file of ``stage`` in ``folder``, e.g. stage_file("train", "model", VDIR)."""
    return f"{folder}/{STAGE_FILES[stage][name]}"


def unit_files(unit):
    """The workflow-written files of a unit: its resolved config and its MLflow run id."""
    return {"config": f"{SD}/{unit}/{CONFIG_FILE}", "run_id": f"{SD}/{unit}/{RUN_ID_FILE}"}


def variant_cfg(wildcards):
    return STUDY.units[sf.variant_unit(wildcards.variant, int(wildcards.seed))]


def _classifier_input(cfg, key):
    """{"classifier": path} when config key ``key`` names the classifier the workflow trains."""
    classifier = stage_file("feature-extractor", "classifier", CLASSIFIER_DIR)
    return {"classifier": classifier} if sf.get_key(cfg, key) == classifier else {}


def train_inputs(wildcards):
    cfg = variant_cfg(wildcards)
    unit = sf.variant_unit(wildcards.variant, wildcards.seed)
    # the classifier is a training input only as the REPA target
    files = {**unit_files(unit), **_classifier_input(cfg, "model.repa_target_weights_path")}
    pretrained = sf.get_key(cfg, "model.pretrained_vae")
    if pretrained is not None:
        files["pretrained_vae"] = pretrained
    if sf.get_key(cfg, "train.fid_every"):  # the gFID probe of Figure 2 scores during training
        files.update(_classifier_input(cfg, "eval.classifier_path"),
                     reference_stats=sf.get_key(cfg, "eval.reference_stats"))
    return files


def model_inputs(wildcards):
    """Inputs of sample, nll and latents: the unit's files and its trained model."""
    unit = sf.variant_unit(wildcards.variant, wildcards.seed)
    return {**unit_files(unit), "model": stage_file("train", "model", f"{SD}/{unit}")}


def eval_inputs(wildcards):
    """Inputs of reconstruct (rFID) and fid: the model, the reference statistics (ours, or the
    precomputed ones named in base.eval.reference_stats: a missing file then fails the run
    before anything starts), and the classifier when it is the FID feature extractor."""
    cfg = variant_cfg(wildcards)
    return {**model_inputs(wildcards), **_classifier_input(cfg, "eval.classifier_path"),
            "reference_stats": sf.get_key(cfg, "eval.reference_stats")}


def fid_floor_inputs(wildcards):
    """Inputs of the real-vs-real floor: its unit's files, the reference statistics and the
    classifier when it is the FID feature extractor."""
    cfg = STUDY.units[SHARED_UNITS["fid-floor"]]
    return {**unit_files(SHARED_UNITS["fid-floor"]), **_classifier_input(cfg, "eval.classifier_path"),
            "reference_stats": sf.get_key(cfg, "eval.reference_stats")}


def fid_inputs(wildcards):
    unit = sf.variant_unit(wildcards.variant, wildcards.seed)
    return {**eval_inputs(wildcards), "samples": stage_file("sample", "samples", f"{SD}/{unit}")}


def setup_params(wildcards):
    """The explicit config of a unit: a plain dict, so Snakemake's params trigger re-runs the
    unit's setup (and so all its stages) when, and only when, this unit's config changes."""
    return STUDY.units[wildcards.unit]


def run_tags(wildcards):
    return sf.unit_tags(STUDY, wildcards.unit)


def setup_args(wildcards):
    """The arguments of ``python -m simflow.study setup-unit`` for a unit: its explicit config
    and its run tags, as JSON."""
    return shlex.join(["--unit", wildcards.unit, "--config", json.dumps(setup_params(wildcards)),
                       "--tags", json.dumps(run_tags(wildcards))])


def per_unit(pattern):
    """``pattern`` (with {variant} and {seed}) for every variant and seed of the study."""
    return [pattern.format(variant=v, seed=s) for v in STUDY.variants for s in STUDY.seeds]


def posterior_label(cfg):
    """How a unit's latents are made, for the noise-robustness table: "fixed σ̄=0.5",
    "learnable", "layernorm", or "none" for pixel-space variants."""
    full = sf.resolved_config(cfg)
    if full.model.mode == "pixel":
        return "none"
    if full.vae.posterior == "fixed":
        return f"fixed σ̄={full.vae.fixed_std:g}"
    return full.vae.posterior


def decoder_scale_label(cfg):
    """The rate weighting of a unit for the summary: b (a number), "calibrated", or "w=<raw>"."""
    model = sf.resolved_config(cfg).model
    if model.mode != "end_to_end":  # no trade-off between the NLL and the pixel losses there
        return "n/a" if model.decoder_scale is not None else f"w={model.nll_weight:g}"
    if model.decoder_scale is None:
        return f"w={model.nll_weight:g}"
    return model.decoder_scale


def pretrain_summary(cfg):
    """The training summary of the unit's pretrained VAE (frozen modes), or None."""
    vae = sf.get_key(cfg, "model.pretrained_vae")
    return None if vae is None else stage_file("pretrain-vae", "summary", vae.rsplit("/", 1)[0])


def summary_units():
    """[variant, seed, group, sigma, posterior, decoder scale, pretrain summary or None] of every
    unit, in study order."""
    rows = []
    for v in STUDY.variants:
        for s in STUDY.seeds:
            cfg = STUDY.units[sf.variant_unit(v, s)]
            rows.append([v, s, STUDY.variants[v].group, STUDY.variants[v].sigma, posterior_label(cfg),
                         decoder_scale_label(cfg), pretrain_summary(cfg)])
    return rows


def pretrain_summaries():
    """Inputs of the summary: every pretrained VAE's training summary (its wall-clock counts
    towards the frozen variants' compute)."""
    return sorted({p for *_, p in summary_units() if p is not None})


FIGURES = ["fig2_gfid_training", "fig3a_noise_robustness", "fig3b_interpolations", "fig4_latent_stats",
           "fig5_fid", "fig_rate_sweep", "samples_grid"]


def guidance_units():
    """[variant, seed] of every unit with a CFG sweep (eval.guidance_weights set)."""
    return [[v, s] for v in STUDY.variants for s in STUDY.seeds
            if sf.get_key(STUDY.units[sf.variant_unit(v, s)], "eval.guidance_weights")]


GUIDANCE_FIGURE = f"{SD}/figures/guidance_{{variant}}_s{{seed}}.png"


def all_targets():
    stage_files = [path for stage in ("train", "sample", "fid", "reconstruct", "nll", "latents")
                   for path in stage_outputs(stage, VDIR).values()]
    guidance = [GUIDANCE_FIGURE.format(variant=v, seed=s) for v, s in guidance_units()]
    return ([f for p in stage_files for f in per_unit(p)]
            + [f"{SD}/summary.csv", f"{SD}/summary.md"]
            + [f"{SD}/figures/{name}.png" for name in FIGURES] + guidance)


def tracking_args():
    """``--tracking-uri`` of the study (when configured), for the simflow.study commands."""
    uri = STUDY.tracking["tracking_uri"]
    return ["--tracking-uri", uri] if uri else []


def check_study_store():
    """The onstart check of the study's tracking store (simflow.study.check_study_store): on a
    store that cannot be used, one error line naming it and the fix, and exit status 2 before
    the first job (Snakemake would print a traceback for an exception raised here)."""
    try:
        sf.check_study_store(STUDY.tracking, STUDY.results_root)
    except ValueError as err:
        logger.error(f"simflow: error: {err}")
        sys.exit(2)


def set_study_run_status(status):
    """Mark the study's MLflow parent run RUNNING / FINISHED / FAILED (the onstart, onsuccess and
    onerror handlers of the Snakefile). Runs as its own process (MLflow is not imported into
    Snakemake's); a failure is a warning, never a failed workflow. Nothing to do when tracking
    is off or the parent run does not exist yet (rule mlflow_init creates it RUNNING)."""
    if not STUDY.tracking["enabled"] or not os.path.isfile(STUDY.parent_run_id_file):
        return
    cmd = [sys.executable, "-m", "simflow.study", "run-status", status, "--results-root",
           STUDY.results_root, "--run-id-file", STUDY.parent_run_id_file, *tracking_args()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning(f"MLflow: could not mark the study run {status}: {err}")
        return
    if proc.returncode != 0:
        logger.warning(f"MLflow: could not mark the study run {status}: "
                       f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


# The stage server of this invocation (None: none running): started in onstart, stopped in
# onsuccess/onerror; it also stops by itself when this Snakemake process is gone.
STAGE_SERVER = None


def start_stage_server():
    """The onstart start of the stage server (simflow.stage_server): one process with torch and
    MLflow loaded, whose forked workers run the stages with the local launcher (their jobs find
    it in $SIMFLOW_STAGE_SERVER). Not when the study turns it off (`stage_server: false`), no
    stage runs locally, or the rules run in conda environments (another Python than this one).
    A server that does not start is a warning: the stages then import everything themselves."""
    global STAGE_SERVER
    off = sf.stage_server_off(STUDY)
    if off is None and workflow.deployment_settings.deployment_method:
        off = "the rules run in their own software environments (--sdm)"
    if off is not None:
        logger.info(f"simflow: no stage server ({off}); each stage imports torch and MLflow itself")
        return
    try:
        STAGE_SERVER = StageServer.start(f"{LOGS}/stage-server.log")
    except RuntimeError as err:
        logger.warning(f"simflow: {err}; each stage imports torch and MLflow itself")
        return
    os.environ[SERVER_ENV] = STAGE_SERVER.socket_path


def stop_stage_server():
    """The onsuccess/onerror stop of the stage server started by start_stage_server."""
    global STAGE_SERVER
    if STAGE_SERVER is not None:
        os.environ.pop(SERVER_ENV, None)
        STAGE_SERVER.stop()
        STAGE_SERVER = None
