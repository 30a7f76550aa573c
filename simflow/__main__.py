"""``python -m simflow`` is the ``simflow`` command (the workflow's rules call it this way).

A stage process ends without the interpreter's teardown of its modules: with torch and MLflow
loaded, freeing every module and object at exit costs about 1 CPU second, per process, for
nothing (docs/performance.md, "Stage start-up"). The atexit handlers still run (logging, MLflow,
torch), the standard streams are flushed, and the exit status is main()'s. An exception leaving
main() (including SystemExit: a signal, a usage error) takes the ordinary way out.
"""

import atexit
import os
import sys

from simflow.cli import main


def exit_now(status: int) -> None:
    """Run the atexit handlers, flush stdout/stderr and end the process with ``status`` without
    tearing the interpreter down."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to write
            pass
    os._exit(status)


exit_now(int(main() or 0))
