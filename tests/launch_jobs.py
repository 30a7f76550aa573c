"""Picklable callables for tests/test_launch.py.

submitit pickles module-level functions by reference, so the job's interpreter imports this
module: the tests put tests/ on PYTHONPATH (submitit-local copies the environment).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise RuntimeError(message)


def sleep_then(seconds: float, value: object, pid_file: str | None = None) -> object:
    """Record this task's pid (so a test can check it was killed), sleep, return ``value``."""
    if pid_file is not None:
        Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return value


def distributed_probe(out_dir: str) -> dict[str, str]:
    """Export the torch.distributed variables the way a submitted Call does; write them per rank."""
    from simflow.launch import export_distributed_env

    env = export_distributed_env()
    assert env is not None, "expected a multi-task submitit job"
    Path(out_dir, f"rank{env['RANK']}.json").write_text(json.dumps(env))
    return env


def env_probe(names: list[str]) -> dict[str, str | None]:
    return {n: os.environ.get(n) for n in names}
