"""The client side of the stage server (:mod:`simflow.stage_server`) and the wire format both use.

``python -m simflow <stage>`` run by the workflow finds the server's socket in
:data:`SERVER_ENV`. With the local launcher the CLI then hands the stage to the server
(:func:`run_through_server`) instead of importing torch and MLflow itself: the request carries
the argv, the working directory, the environment and this process's stdin/stdout/stderr (the
file descriptors themselves, so the stage writes to the rule's log directly). The server forks a
worker that already has torch and MLflow loaded; this process waits for its exit status and
ends the same way (the same exit code, or killed by the same signal). SIGINT, SIGTERM and SIGHUP
sent to this process are forwarded to the worker's process group; if this process dies, the
server sees its connection close and kills the worker.

A socket that cannot be reached, or a server that turns the request down (another Python or
``sys.path``), is reported in one line on stderr and the stage then runs in this process: the
same computation, only without the saved start-up.

This module imports only the standard library: it is loaded by every stage process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["FORWARDED_SIGNALS", "SERVER_ENV", "kill_group", "read_message", "recv_request",
           "run_through_server", "send_message", "send_request", "server_identity"]

#: The environment variable naming the stage server's Unix socket (set by the workflow).
SERVER_ENV = "SIMFLOW_STAGE_SERVER"
#: The signals the client passes on to the worker's process group.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")  # the request's JSON length
_STDIO = 3  # stdin, stdout, stderr


def server_identity() -> dict[str, Any]:
    """What must match between client and server for the server to run the client's stage (the
    same code): the interpreter, the simflow package's folder and the module search path after
    its first entry (the script's folder or the cwd, which may differ)."""
    return {"executable": os.path.realpath(sys.executable),
            "package": os.path.dirname(os.path.realpath(__file__)),
            "path": [os.path.realpath(p) if p else p for p in sys.path[1:]]}


def send_request(sock: socket.socket, argv: Sequence[str]) -> None:
    """Send the stage request: argv, cwd, umask, environment, identity, and fds 0, 1 and 2."""
    umask = os.umask(0o022)  # read it (there is no other way) and put it back
    os.umask(umask)
    body = json.dumps({"argv": list(argv), "argv0": sys.argv[0], "cwd": os.getcwd(), "umask": umask,
                       "env": dict(os.environ), **server_identity()}).encode()
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], [0, 1, 2])
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request sent by :func:`send_request` and its three file descriptors (server side)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, _STDIO)
    try:
        if len(fds) != _STDIO or len(data) < _HEADER.size:
            raise ValueError(f"a request carries {_STDIO} file descriptors and a header; got "
                             f"{len(fds)} and {len(data)} bytes")
        (size,) = _HEADER.unpack_from(data)
        data = data[_HEADER.size:]
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ValueError("the client closed the connection in the middle of its request")
            data += chunk
        return json.loads(data), fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


def send_message(sock: socket.socket, **message: Any) -> None:
    """One JSON line from the server to the client."""
    sock.sendall(json.dumps(message).encode() + b"\n")


def read_message(sock: socket.socket, pending: bytearray) -> dict[str, Any] | None:
    """The next JSON line from the server, or None when it closed the connection."""
    while b"\n" not in pending:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return json.loads(line)


def _say(text: str) -> None:
    print(f"simflow: stage server: {text}", file=sys.stderr, flush=True)


def run_through_server(socket_path: str, argv: Sequence[str]) -> int | None:
    """Run the stage ``argv`` (the CLI's arguments) in a worker of the server at
    ``socket_path``; its exit status. A worker killed by a signal kills this process with the
    same signal. None (after one line on stderr) when no worker was started: the caller runs
    the stage itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        send_request(sock, argv)
    except OSError as err:
        sock.close()
        _say(f"cannot reach {socket_path} ({type(err).__name__}: {err}); running the stage in "
             "this process")
        return None
    pending = bytearray()
    worker: dict[str, int | None] = {"pgid": None, "signal": None}

    def forward(signum: int, _frame: FrameType | None) -> None:
        worker["signal"] = signum
        if worker["pgid"] is not None:
            kill_group(worker["pgid"], signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        with sock:
            try:
                started = read_message(sock, pending)
            except OSError:
                started = None
            if started is None or "refused" in started:
                why = "closed the connection" if started is None else started["refused"]
                if worker["signal"] is not None:  # stopped before anything started
                    return _die_by(worker["signal"])
                _say(f"{socket_path} started no worker ({why}); running the stage in this process")
                return None
            worker["pgid"] = started["pid"]
            if worker["signal"] is not None:  # arrived before the worker's pid
                kill_group(started["pid"], worker["signal"])
            try:
                done = read_message(sock, pending)
            except OSError:
                done = None
            if done is None:
                kill_group(started["pid"], signal.SIGTERM)
                _say(f"the server's connection closed before the stage's exit status (worker pid "
                     f"{started['pid']}, sent SIGTERM); the stage's outcome is unknown")
                return 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if done.get("signal") is not None:
        return _die_by(done["signal"])
    return int(done["exit"])


def kill_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to the process group ``pgid``; nothing when it is already gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # already gone
        pass


def _die_by(signum: int) -> int:
    """End this process by ``signum`` (as the worker ended), flushing the streams first; the
    shell's status 128+signum should the signal be blocked."""
    sys.stdout.flush()
    sys.stderr.flush()
    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum
