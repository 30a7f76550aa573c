"""The names that the package, the workflow's ``.smk`` files and the tests agree on.

Stages and the files each one writes, the files of a unit folder, the model modes and the
launcher backends: each is spelled here once and imported everywhere else (the ``.smk`` files
through ``workflow/rules/common.smk``). Plain constants, no imports: Snakemake reads this at parse
time and the CLI lists the stages from it without loading torch.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "CONFIG_FILE",
    "DECODER_TRAINING_MODES",
    "FROZEN_MODES",
    "GROUPS",
    "LATENT_GROUP",
    "MODEL_MODES",
    "PARENT_RUN_ID_FILE",
    "PIXEL_GROUP",
    "RATE_SWEEP",
    "RUN_ID_FILE",
    "RUN_ID_PATTERN",
    "SHARED_DIR",
    "SHARED_UNITS",
    "SIGMA_SWEEP",
    "STAGES",
    "STAGE_FILES",
    "TRACKING_DISABLED",
    "TRAINING_STAGES",
]

#: The stages of ``simflow <stage>``, in DAG order (``preflight`` rehearses the training stages
#: before anything else runs).
STAGES: tuple[str, ...] = (
    "preflight", "feature-extractor", "fid-ref", "fid-floor", "pretrain-vae", "train", "sample", "fid",
    "guidance", "reconstruct", "nll", "latents",
)
#: The final files of each stage, relative to its unit folder, by the name the workflow's rule
#: gives the output. Their existence means the stage finished (each is written atomically).
STAGE_FILES: dict[str, dict[str, str]] = {
    "preflight": {"row": "preflight/preflight.json"},
    "feature-extractor": {"classifier": "classifier.pt", "report": "classifier.json"},
    "fid-ref": {"stats": "reference_stats.npz"},
    "fid-floor": {"metrics": "metrics/real_floor.json"},
    "pretrain-vae": {"vae": "vae.pt", "summary": "train_summary.json"},
    "train": {"model": "model.pt", "summary": "train_summary.json"},
    "sample": {"samples": "samples.npz", "grid": "samples.png"},
    "fid": {"metrics": "metrics/fid.json"},
    "guidance": {"metrics": "metrics/guidance.json", "samples": "guidance_samples.npz"},
    "reconstruct": {"metrics": "metrics/reconstruct.json", "interpolation": "interpolation.npz"},
    "nll": {"metrics": "metrics/nll.json"},
    "latents": {"latents": "latents.npz"},
}
#: Stages that train a model (their MLflow runs also get MLflow's system metrics).
TRAINING_STAGES: tuple[str, ...] = ("feature-extractor", "pretrain-vae", "train")

#: Folder (inside results/<study>/) of the units shared by all variants.
SHARED_DIR = "_shared"
#: The shared units (relative to the study folder), by the stage that writes them (``fid-floor``:
#: the real-vs-real FID/KID floor of the study); the pretrained
#: VAE has one per seed inside its folder (``_shared/pretrain_vae/s<seed>``).
SHARED_UNITS: dict[str, str] = {stage: f"{SHARED_DIR}/{stage.replace('-', '_')}"
                                for stage in ("feature-extractor", "fid-ref", "fid-floor", "pretrain-vae")}
#: A unit folder's resolved stage config, written by the workflow.
CONFIG_FILE = "config.yaml"
#: A unit folder's MLflow run id; the study folder's parent run id.
RUN_ID_FILE = "mlflow_run_id.txt"
PARENT_RUN_ID_FILE = "mlflow_parent_run_id.txt"
#: What a run-id file holds when it names a run: an MLflow run id (32 hex digits).
RUN_ID_PATTERN = r"[0-9a-f]{32}"
#: The study folder's record of its last parent run (id, store, experiment), kept beside the
#: parent run-id file, which Snakemake removes before it re-runs the rule that writes it.
PARENT_RUN_RECORD = ".mlflow_parent_run.json"
#: A unit folder's list of the dataset files skipped as unreadable (``data.on_bad_file=skip``),
#: one per split: ``path<TAB>reason`` per line, appended by every process that meets one.
SKIPPED_FILES = "skipped_files.{split}.txt"
#: What a run-id file holds when tracking is switched off (the file still exists: it is a
#: Snakemake output).
TRACKING_DISABLED = "tracking disabled"

#: ``model.mode``: VAE and flow trained jointly (SimFlow), pretrained VAE frozen, encoder frozen
#: and decoder fine-tuned (STARFlow), or TarFlow on pixels.
MODEL_MODES: tuple[str, ...] = ("end_to_end", "frozen_vae", "frozen_encoder", "pixel")
#: Modes that consume the shared pretrained VAE (the ``pretrain-vae`` stage).
FROZEN_MODES: tuple[str, ...] = ("frozen_vae", "frozen_encoder")
#: Modes whose decoder is trained (so they take the perceptual and adversarial losses).
DECODER_TRAINING_MODES: tuple[str, ...] = ("end_to_end", "frozen_encoder")

#: Variant groups (a study's ``variants.<name>.group``): ``latent`` variants are the paper's
#: latent-space models; ``sigma_sweep`` variants form the σ̄ curve of Figure 5; ``rate_sweep``
#: variants the curve over the decoder scale (the rate weight); ``pixel`` variants have no VAE
#: latents.
LATENT_GROUP, SIGMA_SWEEP, RATE_SWEEP, PIXEL_GROUP = "latent", "sigma_sweep", "rate_sweep", "pixel"
GROUPS: tuple[str, ...] = (LATENT_GROUP, SIGMA_SWEEP, RATE_SWEEP, PIXEL_GROUP)

#: ``launcher.backend``: in this process, a submitit subprocess, or a SLURM job via submitit.
BACKENDS: tuple[str, ...] = ("local", "submitit-local", "slurm")
