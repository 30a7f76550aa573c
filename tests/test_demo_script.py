"""Tests of scripts/demo.sh, the README's first command, on stand-ins for apt-get, sudo, id and
the Python interpreter (each records its arguments): as root without sudo, as a user with sudo,
without apt-get (macOS), with an OS-managed interpreter (PEP 668). Also checks that the
README's first command is that script, and that CI runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

RECORDER = textwrap.dedent("""\
    #!/bin/sh
    # records "<name> <args>" (and SIMFLOW_ALLOW_DOWNLOAD when set) in $CALLS
    echo "$(basename "$0")${SIMFLOW_ALLOW_DOWNLOAD:+ [download]} $*" >> "$CALLS"
    """)

# The interpreter stand-in: the PEP 668 probe (`-c 'import sys, sysconfig ...'`) exits with
# $MANAGED; `-m venv DIR` makes DIR/bin/python (this stand-in again); the rest is recorded.
PYTHON = textwrap.dedent("""\
    #!/bin/sh
    case "$2" in *EXTERNALLY-MANAGED*) exit "${MANAGED:-1}";; esac
    echo "python${SIMFLOW_ALLOW_DOWNLOAD:+ [download]} $*" >> "$CALLS"
    if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
    exit 0
    """)


def run_demo(tmp_path: Path, *args: str, uid: int = 0, apt: bool = True, sudo: bool = False,
             managed: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "demo.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ["dirname", "env", "rm", "mkdir", "cp", "basename", "sh", "bash"]
    for tool in tools:  # only these real tools: no apt-get or sudo unless stood in for
        os.symlink(shutil.which(tool), bin_dir / tool)
    for name, present in (("apt-get", apt), ("sudo", sudo)):
        if present:
            (bin_dir / name).write_text(RECORDER)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "python3").write_text(PYTHON)
    for f in bin_dir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {"PATH": str(bin_dir), "CALLS": str(calls), "MANAGED": "0" if managed else "1",
           "HOME": str(tmp_path)}
    proc = subprocess.run([str(bin_dir / "bash"), str(repo / "scripts" / "demo.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, lines


def test_as_root_without_sudo(tmp_path):
    proc, calls = run_demo(tmp_path, "config/smoke.yaml", uid=0, sudo=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install -y") and "dataset-fashion-mnist" in calls[1]
    assert calls[2] == 'python -m pip install -q -e .[test]'
    # the configs are checked first: Snakemake reports an unparsable one without naming it
    assert calls[3] == "python -m simflow.study check --merged config/smoke.yaml"
    assert calls[4] == "python -m snakemake -c2 --configfile config/smoke.yaml"
    assert not any(c.startswith("sudo") for c in calls)


def test_as_a_user_with_sudo(tmp_path):
    proc, calls = run_demo(tmp_path, uid=1000, sudo=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls[0] == "sudo apt-get update -qq"
    assert calls[1].startswith("sudo env DEBIAN_FRONTEND=noninteractive apt-get install")
    assert calls[-1] == "python -m snakemake -c2 --configfile config/demo.yaml"  # the default study


def test_as_a_user_without_sudo_says_what_is_needed(tmp_path):
    proc, calls = run_demo(tmp_path, uid=1000, sudo=False)
    assert proc.returncode == 1 and calls == []
    assert "run this as root or install sudo" in proc.stdout


def test_without_apt_the_dataset_comes_from_torchvision_or_a_local_copy(tmp_path):
    proc, calls = run_demo(tmp_path, "config/demo.yaml", apt=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [line for line in proc.stdout.splitlines() if "Fashion-MNIST" in line]
    assert len(notes) == 1 and "torchvision downloads it" in notes[0] and "offline" in notes[0]
    assert calls[0] == 'python -m pip install -q -e .[test]'
    assert calls[1].startswith("python [download] -c")  # one download, before the workflow
    assert calls[2] == "python -m simflow.study check --merged config/demo.yaml config/local_data.yaml"
    assert calls[3] == "python -m snakemake -c2 --configfile config/demo.yaml config/local_data.yaml"


def test_an_os_managed_interpreter_installs_into_a_venv(tmp_path):
    proc, calls = run_demo(tmp_path, managed=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python -m venv .venv" in calls
    assert calls[-3] == 'python -m pip install -q -e .[test]'  # .venv/bin/python
    assert (tmp_path / "repo" / ".venv" / "bin" / "python").is_file()
    assert ". .venv/bin/activate" in proc.stdout


def test_the_readme_starts_with_the_script_and_ci_runs_it():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[0].split("#")[0].strip() == "bash scripts/demo.sh config/demo.yaml"
    assert commands[1].split("#")[0].strip() == "python3 -m pytest"
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "smoke.yaml" in ci and 'bash -c "$demo"' in ci  # the README's first command
    assert re.search(r"^python3 -m pytest", ci, re.MULTILINE)
