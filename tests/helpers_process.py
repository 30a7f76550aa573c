"""Waiting for a process to end, shared by the launcher and stage-server tests."""

import os
import time


def wait_until_gone(pid: int, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Whether process ``pid`` no longer exists within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(poll_s)
    return False
