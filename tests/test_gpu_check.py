"""scripts/gpu_check.sh and its report writer (simflow.gpu_report), for what a CPU can check: the
arguments, the clear stop without CUDA, and the report from fake test and bench outputs."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from simflow import gpu_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="6">
<testcase classname="tests.test_gpu" name="test_bf16_training_step_matches_fp32_on_gpu" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_compiled_sampling_equals_cached_on_gpu" time="1.0">
  <failure message="AssertionError">not close</failure></testcase>
<testcase classname="tests.test_gpu" name="test_jacobi_with_zero_tolerance_equals_cached_on_gpu" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_cuda_graph_sampling_under_bf16_autocast_equals_cached_on_gpu" time="1.0"/>
<testcase classname="tests.test_sampling_fast_paths" name="test_cuda_graph_step_equals_eager_on_gpu" time="1.0"/>
</testsuite></testsuites>
"""


def fake_sample(diff: float = 1e-3) -> dict:
    entry = {"img_per_s": 10.0, "max_abs_diff_vs_cached": diff, "finite": True}
    return {"device": {"name": "NVIDIA H200", "torch": "2.14"}, "sample": {
        "batch": 64, "tokens": 256, "amp": "bf16",
        "modes": {"cached": dict(entry, max_abs_diff_vs_cached=0.0), "cuda_graph": entry,
                  "cuda_graph+cfg": entry, "jacobi+cfg": dict(entry, max_abs_diff_vs_cached=0.3)},
        "speedups": {"cuda_graph_vs_cached": 2.5, "cuda_graph+cfg_vs_cached+cfg": 2.25}}}


def fake_train() -> dict:
    return {"device": {"name": "NVIDIA H200", "torch": "2.14"},
            "train": {"batch": 64, "img_per_s": 250.0, "achieved_tflops": 420.0, "mfu": 0.425,
                      "max_memory_gib": 60.2}}


def write(tmp_path: Path, sample: dict) -> tuple[Path, Path, Path]:
    junit, train, samp = tmp_path / "t.xml", tmp_path / "train.json", tmp_path / "sample.json"
    junit.write_text(JUNIT)
    train.write_text(json.dumps(fake_train()))
    samp.write_text(json.dumps(sample))
    return junit, train, samp


def test_report_marks_each_mode_by_its_tests_and_its_bench_deviation(tmp_path):
    junit, train, samp = write(tmp_path, fake_sample())
    out = tmp_path / "docs" / "gpu_report.md"
    assert gpu_report.main(["--junit", str(junit), "--train", str(train), "--sample", str(samp),
                            "--meta", "commit=abc1234", "--out", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H200" in text and "- commit: abc1234" in text
    assert "| cuda_graph | passed | 2.50× | 2.25× |" in text
    assert "| compiled | failed |" in text  # its GPU test failed
    assert "| jacobi | passed |" in text  # approximate by design: its bench deviation is not a failure
    assert "| 64 | 250.0 | 420.0 | 42.5% | 60.2 |" in text
    assert "| test_compiled_sampling_equals_cached_on_gpu | failed |" in text


def test_report_fails_a_mode_whose_bench_output_left_the_tolerance_and_notes_missing_runs(tmp_path):
    junit, _, samp = write(tmp_path, fake_sample(diff=0.5))
    out = tmp_path / "r.md"
    assert gpu_report.main(["--junit", str(junit), "--sample", str(samp),
                            "--train", str(tmp_path / "absent.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| cuda_graph | failed |" in text
    assert "## Training step at the paper's flow size\n\nNot measured" in text
    assert gpu_report.main(["--out", str(out)]) == 0  # nothing ran: every mode "not run"
    assert "| cuda_graph | not run |" in out.read_text()
    assert gpu_report.main(["--meta", "no-equals-sign", "--out", str(out)]) == 2


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_script_refuses_bad_arguments_before_doing_anything():
    proc = run_script("--frobnicate")
    assert proc.returncode == 2 and "unknown argument '--frobnicate'" in proc.stderr
    proc = run_script("--batch", "zero")
    assert proc.returncode == 2 and "positive integers, got 'zero'" in proc.stderr
    proc = run_script("--help")
    assert proc.returncode == 0 and "docs/gpu_report.md" in proc.stdout


def test_script_stops_with_a_clear_message_without_cuda(tmp_path):
    out = tmp_path / "report.md"
    proc = run_script("--out", str(out), "--work", str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing written
