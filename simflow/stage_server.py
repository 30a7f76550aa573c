"""The stage server: a pre-forking process that has torch and MLflow loaded once for every stage.

Each stage job of the workflow is its own ``python -m simflow <stage>`` process, and most of a
short stage's CPU time goes to imports (torch, MLflow, MLflow's SQLAlchemy store:
docs/performance.md, "Stage start-up"). With the local launcher the workflow starts one server
(:class:`StageServer`, in the Snakefile's ``onstart``) that imports those modules
(:data:`PRELOAD`) and then waits on a Unix socket. For each request of a stage process
(:func:`simflow.stage_client.run_through_server`) it forks:

* a *waiter*, which forks the *worker* and reports the worker's exit status (exit code or
  signal) to the client; if the client's connection closes first (the job was killed), it kills
  the worker's process group (SIGTERM, SIGKILL after :data:`KILL_GRACE_S`);
* the *worker*, in a process group of its own, which takes the client's stdin/stdout/stderr,
  working directory, environment and thread count (``OMP_NUM_THREADS``; torch was imported
  before that environment existed) and runs :func:`simflow.cli.main` on the client's argv, in
  this already-loaded interpreter, then ends like ``python -m simflow`` (:func:`exit_now`).

Forking is safe only from a process with one thread, no open database connection and no CUDA
context. The server imports modules and nothing more (MLflow opens its store in the worker), and
checks before it accepts, and before every fork, that it has one OS thread and CUDA is not
initialised (:func:`fork_unsafe_reason`). The imports are made single-threaded by their
environment (:data:`IMPORT_ENV`): BLAS with one thread, and no background thread of the jemalloc
that pyarrow (imported by MLflow through pandas) brings. The server is single-threaded itself:
one loop over the listening socket and its owner's pidfd; it ends when its owner (Snakemake) is
gone, on SIGTERM (:meth:`StageServer.stop`), or on SIGINT.

Requests are accepted only from the same interpreter with the same ``sys.path`` (the same code);
any other is refused, and its client runs the stage itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from simflow.cli import main as cli_main
from simflow.fastexit import exit_now
from simflow.stage_client import SERVER_ENV, kill_group, recv_request, send_message, server_identity

__all__ = ["IMPORT_ENV", "KILL_GRACE_S", "PRELOAD", "StageServer", "fork_unsafe_reason", "serve"]

#: What every stage process imports and the server imports once: torch, MLflow and its SQLite
#: store (SQLAlchemy, alembic), and the stage modules.
PRELOAD = (
    "torch",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.db.utils",
    "simflow.runner",
    "simflow.stages",
    "simflow.tracking",
    "simflow.distributed",
)
#: The environment of the server's imports: none of them may start a thread. BLAS pools start
#: their threads when the library loads (a stage gets its own count after the fork), and
#: pyarrow's bundled jemalloc starts a background purging thread unless told not to.
IMPORT_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}
#: Seconds between SIGTERM and SIGKILL for the worker of a client that went away.
KILL_GRACE_S = 5.0


class _Stop(Exception):
    """Raised by the server's SIGTERM/SIGINT handler: leave the accept loop."""


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def fork_unsafe_reason() -> str | None:
    """Why this process must not fork workers now (a second OS thread, an initialised CUDA
    context), or None."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in threads)
        return f"{len(threads)} OS threads ({', '.join(names)}); a fork copies only one"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the server"
    return None


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def serve(socket_path: str, owner_pid: int) -> int:
    """Listen on ``socket_path``, import :data:`PRELOAD`, then serve stage requests until the
    process ``owner_pid`` is gone or a SIGTERM/SIGINT arrives; 0, or 1 when the server cannot
    fork safely (it then serves no request: clients run their stages themselves)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    owner = os.pidfd_open(owner_pid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound before the imports: a stage that starts meanwhile waits in the backlog (seconds)
    # instead of finding no socket and running on its own.
    listener.bind(socket_path)
    listener.listen(128)
    try:
        start, cpu = time.monotonic(), time.process_time()
        for name in PRELOAD:
            importlib.import_module(name)
        reason = fork_unsafe_reason()
        if reason is not None:
            _log(f"stage server: cannot fork stage workers safely: {reason}")
            return 1
        _log(f"stage server: ready ({len(PRELOAD)} modules imported in {time.monotonic() - start:.2f} s, "
             f"{time.process_time() - cpu:.2f} CPU-s; pid {os.getpid()}, socket {socket_path})")
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(owner, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select(timeout=1.0):
                    if key.fileobj == owner:
                        _log(f"stage server: owner pid {owner_pid} is gone; stopping")
                        return 0
                    conn, _ = listener.accept()
                    _handle(conn, server_fds=(listener.fileno(), owner))
                _reap_waiters()
    except _Stop as why:
        _log(f"stage server: {why}; stopping")
        return 0
    finally:
        listener.close()
        os.close(owner)
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass


def _reap_waiters() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _refusal(request: dict[str, Any]) -> str | None:
    mine = server_identity()
    if request.get("executable") != mine["executable"]:
        return f"the server runs {mine['executable']}, the stage {request.get('executable')}"
    if request.get("package") != mine["package"]:
        return f"the server runs simflow from {mine['package']}, the stage from {request.get('package')}"
    if request.get("path") != mine["path"]:
        return "the stage's sys.path differs from the server's (another checkout or PYTHONPATH)"
    return fork_unsafe_reason()


def _handle(conn: socket.socket, server_fds: Sequence[int]) -> None:
    """Read one request and fork its waiter (or refuse it)."""
    conn.settimeout(10.0)  # a client sends its request at once; never block the server for long
    try:
        request, fds = recv_request(conn)
    except (OSError, ValueError) as err:
        _log(f"stage server: bad request ({type(err).__name__}: {err})")
        conn.close()
        return
    try:
        refusal = _refusal(request)
        if refusal is not None:
            _log(f"stage server: refused {request.get('argv')}: {refusal}")
            send_message(conn, refused=refusal)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            status = 70  # EX_SOFTWARE: the waiter itself failed
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client forwards it to the worker
                for fd in server_fds:
                    os.close(fd)
                conn.settimeout(None)
                status = _wait_for_worker(conn, fds, request)
            except BaseException:  # noqa: BLE001 - a forked child must never return into the loop
                traceback.print_exc()
            finally:
                os._exit(status)
    except OSError as err:  # the client went away before its reply
        _log(f"stage server: request {request.get('argv')}: {type(err).__name__}: {err}")
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _wait_for_worker(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> int:
    """The waiter: fork the worker, report its pid, then its exit status; kill its process group
    if the client goes away first."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            _run_worker(fds, request)
        except BaseException:  # noqa: BLE001 - a forked child must never return into the loop
            traceback.print_exc()
        finally:
            os._exit(70)
    try:
        os.setpgid(pid, pid)  # the worker does it too: whichever runs first
    except (PermissionError, ProcessLookupError):
        pass
    for fd in fds:
        os.close(fd)
    worker = os.pidfd_open(pid)
    _log(f"stage server: {' '.join(request['argv'][:1])} started (worker {pid})")
    try:
        send_message(conn, pid=pid)
        client_gone = False
    except OSError:
        client_gone = True
    with selectors.DefaultSelector() as selector:
        selector.register(worker, selectors.EVENT_READ)
        selector.register(conn, selectors.EVENT_READ)
        while not client_gone:
            if any(key.fileobj == worker for key, _ in selector.select()):
                break
            try:  # the client sends nothing after its request: readable means closed
                client_gone = conn.recv(1) == b""
            except OSError:
                client_gone = True
        if client_gone:
            _log(f"stage server: the client of {' '.join(request['argv'][:1])} (worker {pid}) is "
                 "gone; stopping the worker")
            selector.unregister(conn)
            kill_group(pid, signal.SIGTERM)
            if not selector.select(timeout=KILL_GRACE_S):
                kill_group(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    os.close(worker)
    code = os.waitstatus_to_exitcode(status)
    _log(f"stage server: {' '.join(request['argv'][:1])} (worker {pid}) "
         f"{'exit ' + str(code) if code >= 0 else 'killed by ' + signal.Signals(-code).name}, "
         f"{usage.ru_utime + usage.ru_stime:.2f} CPU-s, {time.monotonic() - start:.2f} s")
    if not client_gone:
        try:
            send_message(conn, **({"exit": code} if code >= 0 else {"signal": -code}))
        except OSError:
            pass
    return 0


def _run_worker(fds: list[int], request: dict[str, Any]) -> None:
    """The worker: become the client's process (fds, cwd, environment, umask, threads), run the
    CLI on its argv and end like ``python -m simflow``."""
    os.setpgid(0, 0)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    env = dict(request["env"])
    env.pop(SERVER_ENV, None)  # this process runs the stage: it must not ask the server again
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # found again from this environment's TMPDIR (Snakemake sets it per job)
    os.umask(int(request["umask"]))
    sys.argv = [request["argv0"], *request["argv"]]
    _apply_threads(env)
    # A fresh process seeds NumPy's legacy global generator from the OS; a fork would share the
    # server's state with every other worker.
    importlib.import_module("numpy").random.seed()
    exit_now(_main_status(request["argv"]))


def _apply_threads(env: dict[str, str]) -> None:
    """The thread count a fresh process would take from ``env`` (torch's intra-op pool and the
    BLAS/OpenMP pools that loaded with one thread in the server)."""
    value = env.get("OMP_NUM_THREADS", "")
    threads = int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))
    sys.modules["torch"].set_num_threads(threads)
    if threads != int(IMPORT_ENV["OMP_NUM_THREADS"]):
        threadpoolctl = importlib.import_module("threadpoolctl")
        threadpoolctl.threadpool_limits(threads)


def _main_status(argv: list[str]) -> int:
    """:func:`simflow.cli.main` on ``argv`` as the interpreter would end it: SystemExit's code,
    a traceback and 1 for an exception, death by SIGINT for a KeyboardInterrupt."""
    try:
        return int(cli_main(argv) or 0)
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            return int(err.code or 0)
        print(err.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        return 1


class StageServer:
    """A stage server process started for this process (the workflow's ``onstart``): its socket
    lies in a private temporary folder (mode 0700: only this user can connect)."""

    def __init__(self, proc: subprocess.Popen, socket_path: str) -> None:
        self.proc = proc
        self.socket_path = socket_path

    @classmethod
    def start(cls, log_path: str | os.PathLike, owner_pid: int | None = None,
              timeout_s: float = 60.0) -> StageServer:
        """Start ``python -m simflow.stage_server`` (its output appended to ``log_path``),
        owned by ``owner_pid`` (default: this process), and wait until its socket exists.
        RuntimeError (naming the log) when it ends or does not listen within ``timeout_s``."""
        folder = tempfile.mkdtemp(prefix="simflow-stage-server-")
        socket_path = os.path.join(folder, "socket")
        env = {**os.environ, **IMPORT_ENV}
        env.pop(SERVER_ENV, None)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "simflow.stage_server", "--socket", socket_path,
                 "--owner", str(owner_pid or os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)  # not in the terminal's group: Ctrl-C reaches the clients
        server = cls(proc, socket_path)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(socket_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"the stage server did not start (exit status {proc.returncode}); "
                                   f"see {log_path}")
            time.sleep(0.02)
        return server

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server, wait for it (SIGKILL after ``timeout_s``) and remove its folder;
        its exit status. Workers still running finish on their own."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        folder = os.path.dirname(self.socket_path)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        os.rmdir(folder)
        return self.proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simflow.stage_server", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--owner", type=int, required=True, help="stop when this process is gone")
    args = parser.parse_args(argv)
    return serve(args.socket, args.owner)


if __name__ == "__main__":
    exit_now(main())
