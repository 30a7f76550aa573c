"""Distributed training and sampling, verified on CPU with gloo.

What is checked, through the real CLI under ``torchrun`` (``python -m torch.distributed.run``):

* 2 processes reach the weights of 1 process after N steps with the same global batch, also when
  ``train.micro_batch_size`` forces gradient accumulation (float tolerance: the all-reduce sums
  in another order);
* 2-process ``simflow sample`` writes exactly the samples of the 1-process run;
* after a 2-process run there is one MLflow variant run (metrics logged once per step) and one
  checkpoint series, written by global rank 0 only;
* the same 2-task training as ONE job on the local single-node SLURM, through the submitit
  launcher (``launcher.backend=slurm``) and through a plain ``srun`` step.

The objective is made deterministic (``model.mode=pixel``, ``model.latent_noise_std=0``,
``flow.label_drop=0``): each rank seeds its own stream (seed·world + rank), so stochastic terms
(posterior noise, label dropout) differ between a 1- and a 2-process run by design.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simflow import stages
from simflow.config import load_config, to_dict
from simflow.distributed import (
    DistEnv,
    all_reduce_mean_,
    broadcast_object,
    check_launch_backend,
    cuda_device_index,
    first_slurm_host,
    init_distributed,
    mean_over_ranks,
    resolve_environment,
    shutdown,
    slurm_master_port,
)
from simflow.stages import rank_slice
from simflow.tracking import StageRun
from local_slurm import skip_without_slurm

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, GLOBAL_BATCH = 6, 2, 16
# A 2-process run sums gradients in another order than a 1-process run; after 6 AdamW steps the
# weights differ by ~1e-7 (measured 6e-8). The training itself moves them by ~1e-2 (asserted).
ATOL, RTOL = 2e-5, 1e-4
CLI_TIMEOUT_S = 300
SLURM_TIMEOUT_S = 480


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def dist_config(root: Path, **sections: dict) -> Path:
    """A tiny deterministic pixel-space config whose run dir, results and MLflow db are in ``root``."""
    cfg = {
        "study": "d", "variant": "v", "run_dir": str(root / "run"), "results_root": str(root),
        "data": {"name": "digits", "image_size": 8},
        "model": {"mode": "pixel", "latent_noise_std": 0.0},
        "flow": {"channels": 32, "layers_per_block": [1, 1], "head_dim": 16, "label_drop": 0.0},
        "train": {"steps": STEPS, "global_batch_size": GLOBAL_BATCH, "log_every": LOG_EVERY,
                  "checkpoint_every": 2, "keep_every": 2, "warmup_steps": 2, "deterministic": True},
        "sample": {"num_samples": 20, "batch_size": 10},
        "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # torchrun sets 1 thread per process only when it starts several; the same everywhere keeps
    # the CPU kernels (and so the sampled pixels) identical between the 1- and 2-process runs.
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return env


def torchrun(nproc: int, stage: str, config: Path, *sets: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node <nproc> -m simflow <stage> -c <config> --set ...``
    (--standalone: a free rendezvous port, so parallel test runs do not collide)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "simflow", stage, "-c", str(config)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=config.parent, env=cli_env(), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def mlflow_runs(root: Path) -> list:
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids)


def metric_history(root: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def only_variant_run(root: Path):
    runs = mlflow_runs(root)
    kinds = sorted(r.data.tags.get("simflow.kind", "?") for r in runs)
    assert kinds == ["study", "variant"], f"expected one study and one variant run, got {kinds}"
    return next(r for r in runs if r.data.tags["simflow.kind"] == "variant")


# ------------------------------------------------------------------------------------------
# the runs (made once per module: each torchrun start costs ~10 s of imports on 2 cores)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_proc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_proc")
    torchrun(1, "train", dist_config(root))
    return root


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_proc")
    torchrun(2, "train", dist_config(root))
    return root


@pytest.fixture(scope="module")
def two_proc_accum(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_proc_accum")
    torchrun(2, "train", dist_config(root, train={"micro_batch_size": 4}))
    return root


# ------------------------------------------------------------------------------------------
# equal optimisation on 1 and 2 processes
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_process(one_proc, two_proc):
    one = load_ckpt(one_proc / "run" / "model.pt")
    two = load_ckpt(two_proc / "run" / "model.pt")
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert two["summary"]["global_batch_size"] == GLOBAL_BATCH and two["summary"]["accumulation"] == 1
    assert_close_weights(one["model"], two["model"])
    assert_close_weights(one["ema"], two["ema"])
    # The tolerance is meaningful: the last 4 steps alone move the weights far beyond it.
    early = load_ckpt(one_proc / "run" / "checkpoints" / "step_0000002.pt")["model"]
    assert max_abs_diff(early, one["model"]) > 100 * ATOL


@pytest.mark.slow
def test_gradient_accumulation_on_two_processes_matches_one_process(one_proc, two_proc_accum):
    one = load_ckpt(one_proc / "run" / "model.pt")
    accum = load_ckpt(two_proc_accum / "run" / "model.pt")
    # 16 global = 2 ranks x 8 per rank = 2 ranks x 2 micro-batches of 4
    assert accum["summary"]["world_size"] == 2 and accum["summary"]["accumulation"] == 2
    assert_close_weights(one["model"], accum["model"])
    assert_close_weights(one["ema"], accum["ema"])


# ------------------------------------------------------------------------------------------
# the calibrated decoder scale: one value per step, whatever the layout
# ------------------------------------------------------------------------------------------
def e2e_config(root: Path) -> Path:
    """End-to-end SimFlow with the calibrated scale, near-deterministic: a posterior std of 1e-6
    (the ranks' posterior draws differ, by design, but move the reconstructions by ~1e-6)."""
    return dist_config(root, model={"mode": "end_to_end", "latent_noise_std": 0.0},
                       vae={"channel_mult": [1, 2], "base_channels": 8, "latent_channels": 4,
                            "fixed_std": 1e-6},
                       train={"log_every": 1, "keep_every": 0})


@pytest.fixture(scope="module")
def e2e_one_proc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e_one_proc")
    torchrun(1, "train", e2e_config(root))
    return root


@pytest.fixture(scope="module")
def e2e_two_proc_accum(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e_two_proc_accum")
    torchrun(2, "train", e2e_config(root), "train.micro_batch_size=4")
    return root


@pytest.mark.slow
def test_one_and_two_processes_use_the_same_calibrated_scale_at_every_step(e2e_one_proc, e2e_two_proc_accum):
    """b is the previous step's error over the whole global batch: the same on every rank and
    micro-batch (2 ranks × 2 micro-batches of 4 here, 1 × 16 there), so the two runs optimise
    the same objective and reach the same weights. A per-micro-batch b (the error of 4 images)
    would weigh each micro-batch's NLL differently."""
    one = metric_history(e2e_one_proc, only_variant_run(e2e_one_proc).info.run_id, "train/decoder_scale")
    two = metric_history(e2e_two_proc_accum, only_variant_run(e2e_two_proc_accum).info.run_id,
                         "train/decoder_scale")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5)
    assert len({round(v, 6) for _, v in one}) > 1  # b follows the reconstructions
    # The flow's weights agree to ~3e-7 (a per-micro-batch b: 6e-4, measured). The VAE's are not
    # compared: Adam turns the float-level differences of its near-zero L1 gradients (summation
    # order, the ranks' own posterior draws) into lr-sized steps, ~5e-4 with either b.
    flow = [{k: v for k, v in load_ckpt(r / "run" / "model.pt")["model"].items() if k.startswith("flow.")}
            for r in (e2e_one_proc, e2e_two_proc_accum)]
    assert_close_weights(*flow)


# ------------------------------------------------------------------------------------------
# rank 0 alone writes
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_run_writes_one_checkpoint_series_and_the_outputs_of_one_process(one_proc, two_proc):
    ckpts = two_proc / "run" / "checkpoints"
    expected = {"latest.pt", "previous.pt"} | {f"step_{s:07d}.pt" for s in range(2, STEPS + 1, 2)}
    assert {p.name for p in ckpts.iterdir()} == expected  # no per-rank copies, no leftover temp files
    latest = load_ckpt(ckpts / "latest.pt")
    assert latest["step"] == STEPS and latest["world_size"] == 2
    assert len(latest["rng"]) == 2, "the checkpoint holds each rank's RNG stream, for an exact resume"

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root / "run")) for p in (root / "run").rglob("*") if p.is_file()}

    assert files(two_proc) == files(one_proc)
    summary = json.loads((two_proc / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS


@pytest.mark.slow
def test_two_process_run_logs_into_one_mlflow_run_once_per_step(two_proc):
    variant = only_variant_run(two_proc)
    run_id = (two_proc / "run" / "mlflow_run_id.txt").read_text().strip()
    assert variant.info.run_id == run_id and variant.info.status == "FINISHED"
    assert variant.data.tags.get("stage") == "train"
    history = metric_history(two_proc, run_id, "train/total")
    # a second writer (rank 1) would log every step twice
    assert [step for step, _ in history] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert variant.data.params["train.global_batch_size"] == str(GLOBAL_BATCH)


@pytest.mark.slow
def test_logged_losses_describe_the_global_batch_on_any_world_size(one_proc, two_proc):
    one = metric_history(one_proc, only_variant_run(one_proc).info.run_id, "train/total")
    two = metric_history(two_proc, only_variant_run(two_proc).info.run_id, "train/total")
    assert [s for s, _ in one] == [s for s, _ in two]
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5, atol=1e-6)
    final = [json.loads((r / "run" / "train_summary.json").read_text())["final_loss"] for r in (one_proc, two_proc)]
    np.testing.assert_allclose(final[1], final[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_sampling_gives_exactly_the_samples_of_one_process(two_proc, tmp_path):
    """Each sample's noise and label are seeded by its global index and the indices are split
    contiguously, so the union equals the 1-process run bit for bit. Batches of 10 keep every
    forward pass the same in both runs (CPU kernels may round differently for another batch
    shape, which could move a pixel by one level)."""
    outputs = {}
    for nproc in (1, 2):
        root = tmp_path / f"sample{nproc}"
        (root / "run").mkdir(parents=True)
        shutil.copy(two_proc / "run" / "model.pt", root / "run" / "model.pt")
        torchrun(nproc, "sample", dist_config(root, tracking={"enabled": nproc == 2}))
        assert not list((root / "run").glob("samples.rank*")), "per-rank shards must be merged and removed"
        outputs[nproc] = np.load(root / "run" / "samples.npz")
    images, labels = outputs[1]["arr_0"], outputs[1]["arr_1"]
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert np.array_equal(outputs[2]["arr_0"], images)
    assert np.array_equal(outputs[2]["arr_1"], labels)
    assert len(np.unique(images.reshape(20, -1), axis=0)) > 1, "distinct noise per sample index"
    variant = only_variant_run(tmp_path / "sample2")
    assert variant.data.tags.get("stage") == "sample"


def _write_random_model(run_dir: Path, config: Path) -> None:
    """A freshly initialised model.pt in the format `simflow train` writes (sharding tests)."""
    from simflow.model import build_model
    cfg = load_config(config)
    torch.manual_seed(0)
    state = build_model(cfg, 1, 10).state_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": state, "model": state, "config": to_dict(cfg),
                "data_info": {"channels": 1, "num_classes": 10}}, run_dir / "model.pt")


def _sample_as_ranks(config: Path, run_dir: Path, world: int, num_samples: int, monkeypatch) -> dict:
    """stage_sample of every rank of a ``world``-process job, run one after another in this
    process (the barrier is a no-op; rank 0 runs last, as it merges after the barrier)."""
    cfg = load_config(config, [f"run_dir={run_dir}", f"sample.num_samples={num_samples}",
                               "sample.batch_size=1", "tracking.enabled=false"])
    monkeypatch.setattr(stages, "barrier", lambda env: None)
    off = StageRun("sqlite:///unused.db", Path(os.devnull), "sample", enabled=False)
    for rank in reversed(range(world)):
        stages.stage_sample(cfg, DistEnv(rank=rank, world_size=world), off)
    out = np.load(run_dir / "samples.npz")
    return {"images": out["arr_0"], "labels": out["arr_1"]}


@pytest.mark.parametrize("world,num_samples", [(3, 5), (2, 4)])
def test_rank_shards_merge_into_the_single_process_samples(tmp_path, monkeypatch, world, num_samples):
    config = dist_config(tmp_path)
    runs = {}
    for w in (1, world):
        run_dir = tmp_path / f"w{w}"
        _write_random_model(run_dir, config)
        runs[w] = _sample_as_ranks(config, run_dir, w, num_samples, monkeypatch)
        assert not list(run_dir.glob("samples.rank*"))
    assert runs[1]["images"].shape[0] == num_samples
    assert np.array_equal(runs[world]["images"], runs[1]["images"])
    assert np.array_equal(runs[world]["labels"], runs[1]["labels"])


@pytest.mark.parametrize("world,num_samples", [(2, 1), (4, 5)])
def test_a_rank_without_samples_does_not_break_sampling(tmp_path, monkeypatch, world, num_samples):
    config = dist_config(tmp_path)
    _write_random_model(tmp_path / "w", config)
    out = _sample_as_ranks(config, tmp_path / "w", world, num_samples, monkeypatch)
    assert out["images"].shape[0] == num_samples


@pytest.mark.parametrize("n,world", [(20, 2), (7, 3), (5, 4), (1, 2), (1000, 16), (50_000, 16)])
def test_rank_slices_are_contiguous_and_cover_every_index_once(n, world):
    parts = [rank_slice(n, DistEnv(rank=r, world_size=world)) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))


# ------------------------------------------------------------------------------------------
# simflow.distributed: environment, devices, collectives
# ------------------------------------------------------------------------------------------
def test_torchrun_environment_is_read():
    env = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}
    assert resolve_environment(env) == {"rank": 3, "world_size": 16, "local_rank": 3, "local_world_size": 8,
                                        "master_addr": "gpu01", "master_port": 29500, "source": "torch"}
    assert resolve_environment({})["world_size"] == 1
    # the torch variables win over SLURM's (submitit exports them inside its srun step)
    assert resolve_environment({**env, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})["rank"] == 3


def test_plain_srun_step_is_a_distributed_job():
    """`srun -n 16 simflow train` (2 nodes x 8) sets no RANK/WORLD_SIZE: SLURM's variables serve."""
    env = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_ID": "0"}
    where = resolve_environment(env)
    assert where == {"rank": 9, "world_size": 16, "local_rank": 1, "local_world_size": 8,
                     "master_addr": "gpu07", "master_port": slurm_master_port(4242, 0), "source": "slurm"}
    assert 20000 <= where["master_port"] < 60000
    assert slurm_master_port(4242, 1) != slurm_master_port(4242, 0)  # two steps of one job
    # a batch script (no srun step) with several tasks allocated is one process
    assert resolve_environment({"SLURM_NTASKS": "16", "SLURM_PROCID": "0"})["world_size"] == 1


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, r"rank 2 is not in 0\.\.1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_inconsistent_environment_is_one_clear_error(env, match):
    with pytest.raises(ValueError, match=match):
        resolve_environment(env)


@pytest.mark.parametrize("nodelist,host", [
    ("vm", "vm"), ("gpu[03-04,07],cpu1", "gpu03"), ("a,b", "a"), ("rack[1-2]-n[08-09]", "rack1-n08"),
    ("node[0010,0012]", "node0010"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_gpu_of_a_rank():
    assert cuda_device_index(5, 8, 8) == 5      # all GPUs of the node visible to every rank
    assert cuda_device_index(5, 8, 1) == 0      # one GPU bound per task by the scheduler
    with pytest.raises(ValueError, match="8 ranks on this node but only 4 GPUs"):
        cuda_device_index(5, 8, 4)              # two ranks would share a GPU
    with pytest.raises(ValueError, match="no GPU is visible"):
        cuda_device_index(0, 1, 0)


def test_a_rank_may_not_submit_jobs():
    ranks = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match="every rank would submit its own job"):
        check_launch_backend("slurm", ranks)
    check_launch_backend("local", ranks)
    check_launch_backend("slurm", {})


def test_collectives_are_no_ops_for_one_process():
    t = torch.tensor([1.0, 2.0])
    all_reduce_mean_([t], DistEnv())
    assert t.tolist() == [1.0, 2.0]
    assert mean_over_ranks({"b": 2, "a": 1.5}, DistEnv()) == {"a": 1.5, "b": 2.0}
    assert broadcast_object({"x": 1}, DistEnv()) == {"x": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of a 2-task 'srun step' (SLURM variables only, no RANK/WORLD_SIZE)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        os.environ.pop(k, None)
    os.environ.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                      SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="1", SLURM_STEP_ID="0",
                      MASTER_PORT=str(port))
    env = init_distributed("cpu")
    try:
        a = torch.full((2, 3), float(rank + 1))           # means: 1.5
        b = torch.tensor([10.0 * rank], dtype=torch.float64)  # 5.0, another dtype: its own buffer
        all_reduce_mean_([a, b], env)
        result = {"rank": env.rank, "world": env.world_size, "a": a.tolist(), "b": b.tolist(),
                  "metrics": mean_over_ranks({"loss": float(rank), "n": 4.0}, env),
                  "obj": broadcast_object(f"from {rank}", env)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown()


def test_collectives_over_gloo_from_a_slurm_step_environment(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_collectives_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["a"] == [[1.5] * 3] * 2 and res["b"] == [5.0]
        assert res["metrics"] == {"loss": 0.5, "n": 4.0}
        assert res["obj"] == "from 0"


# ------------------------------------------------------------------------------------------
# one SLURM job with 2 tasks (the local single-node SLURM of tests/slurm/)
# ------------------------------------------------------------------------------------------


def _assert_one_slurm_job_of_two_tasks(root: Path, one_proc: Path) -> str:
    summary = json.loads((root / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    variant = only_variant_run(root)
    job_id = variant.data.tags.get("slurm_job_id.train")
    assert job_id and job_id.isdigit(), f"no SLURM job id in the MLflow tags: {variant.data.tags}"
    assert load_ckpt(root / "run" / "checkpoints" / "latest.pt")["world_size"] == 2
    assert_close_weights(load_ckpt(one_proc / "run" / "model.pt")["model"],
                         load_ckpt(root / "run" / "model.pt")["model"])
    return job_id


@pytest.mark.slurm
@pytest.mark.slow
@skip_without_slurm
def test_two_task_training_runs_as_one_slurm_job_through_submitit(tmp_path, one_proc):
    root = tmp_path / "slurm"
    config = dist_config(root)
    log_dir = tmp_path / "submitit"
    sets = ["launcher.backend=slurm", "launcher.partition=debug", "launcher.gpus_per_node=0",
            "launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.timeout_min=5",
            f"launcher.log_dir={log_dir}"]
    cmd = [sys.executable, "-m", "simflow", "train", "-c", str(config)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=root, env=cli_env(), capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = _assert_one_slurm_job_of_two_tasks(root, one_proc)
    # submitit's folder of that one job holds one log pair per task: 2 tasks, 1 job
    logs = sorted(p.name for p in (log_dir / "d.v.train" / job_id).glob(f"{job_id}_*_log.out"))
    assert logs == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"], proc.stderr[-2000:]


@pytest.mark.slurm
@pytest.mark.slow
@skip_without_slurm
def test_two_task_training_runs_as_one_plain_srun_step(tmp_path, one_proc):
    """An sbatch script of the user's own: `srun python -m simflow train` with 2 tasks, no
    torchrun and no submitit; the ranks come from SLURM's variables."""
    root = tmp_path / "srun"
    config = dist_config(root)
    script = root / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --partition=debug --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=5\n"
        f"#SBATCH --output={root}/slurm-%j.out\n"
        f"srun {sys.executable} -m simflow train -c {config}\n")
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    job_log = "\n".join(p.read_text()[-3000:] for p in root.glob("slurm-*.out"))
    assert proc.returncode == 0, f"{proc.stderr}\n{job_log}"
    job_id = _assert_one_slurm_job_of_two_tasks(root, one_proc)
    assert proc.stdout.strip().split(";")[0] == job_id
