"""Ending a short-lived process without the interpreter's teardown.

With torch and MLflow loaded, Python's shutdown (freeing every module and object) costs about
1 CPU second, in each of the ~100 processes of the demo study (docs/performance.md, "Stage
start-up"). :func:`exit_now` skips it; what shutdown must still do is done first: the atexit
handlers run (logging, MLflow's queues, torch), and stdout/stderr are flushed. Only for the end
of a command, after every file it writes is closed.
"""

from __future__ import annotations

import atexit
import os
import sys

__all__ = ["exit_now"]


def exit_now(status: int = 0) -> None:
    """Run the atexit handlers, flush stdout/stderr and end the process with ``status``."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to write
            pass
    os._exit(status)
