"""Whether the throwaway single-node SLURM of tests/slurm/ is up, shared by the slurm tests."""

import shutil
import subprocess

import pytest

SETUP_SCRIPT = "tests/slurm/setup_local_slurm.sh"
TOOLS = ("sinfo", "sbatch", "srun", "scontrol", "scancel", "squeue")


def unavailable_reason() -> str | None:
    """Why the local SLURM cannot be used, or None when the controller answers."""
    hint = f"start it with: sudo SIMFLOW_ALLOW_LOCAL_SLURM=1 {SETUP_SCRIPT} start"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH (no local SLURM); {hint}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"'scontrol ping' did not answer within 20 s; {hint}"
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "no output").splitlines()[0]
        return f"the SLURM controller does not answer ('scontrol ping': {said}); {hint}"
    return None


REASON = unavailable_reason()
skip_without_slurm = pytest.mark.skipif(REASON is not None, reason=REASON or "")
