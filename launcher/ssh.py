"""SSH to every worker of a TPU VM with paramiko: verified host keys, one reused connection per
worker, keepalives, connect retries, and parallel fan-out with `[wK]`-prefixed output."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import paramiko

from launcher.errors import LauncherError

T = TypeVar("T")
KEEPALIVE_SEC = 15


@dataclass
class Worker:
    index: int
    host: str
    port: int = 22
    host_keys: dict[str, str] = field(default_factory=dict)
    """Key type -> base64 key, as the VM published them (guest attributes); empty = unknown."""

    @property
    def label(self) -> str:
        return f"w{self.index}"


def select_workers(workers: list[Worker], spec: str) -> list[Worker]:
    """`all`, `0` or `1,3` -> those workers; an empty selection (`''`, `,`) or an index out of
    range is an error."""
    if spec == "all":
        return workers
    try:
        wanted = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        wanted = []
    if not wanted:
        raise LauncherError(f"--worker {spec!r}: expected 'all', an index such as 0, or a list such as 1,3")
    for i in wanted:
        if not 0 <= i < len(workers):
            raise LauncherError(f"--worker {i}: out of range, the VM has {len(workers)} worker(s) (0..{len(workers) - 1})")
    return [workers[i] for i in dict.fromkeys(wanted)]


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """No published key: remember the first one seen in the launcher's own known_hosts."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(self.path))


class ConnectionLost(LauncherError):
    """A worker's connection is gone: it closed or went silent mid-command (`run` with an
    `idle_timeout`), or it cannot be opened. The cached connection is dropped, so the next call
    opens a fresh one."""


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, paramiko.SSHException)
"""What paramiko raises when a connection breaks under a call."""

FOLLOW_IDLE_SEC = 10.0
"""A watched stream (`run(..., idle_timeout=...)`, e.g. `mllm logs -f`) with no output and no
heartbeat for this long is a dead connection; `MLLM_FOLLOW_IDLE_SEC` overrides it."""
ENV_FOLLOW_IDLE = "MLLM_FOLLOW_IDLE_SEC"


def follow_idle_sec() -> float:
    """FOLLOW_IDLE_SEC, or `$MLLM_FOLLOW_IDLE_SEC` (seconds > 0)."""
    text = os.environ.get(ENV_FOLLOW_IDLE, "").strip()
    if not text:
        return FOLLOW_IDLE_SEC
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise LauncherError(f"{ENV_FOLLOW_IDLE}={text!r}: expected a number of seconds > 0")
    return value


class Connections:
    """One SSH connection per worker, opened on first use and reused for the whole command;
    `drop(worker)` forgets a broken one."""

    def __init__(self, user: str, key_file: Path, known_hosts: Path, retries: int = 4, timeout: float = 20):
        self.user, self.key_file, self.known_hosts = user, key_file, known_hosts
        self.retries, self.timeout = retries, timeout
        self._clients: dict[tuple[str, int], paramiko.SSHClient] = {}
        self._lock = threading.Lock()

    def client(self, w: Worker) -> paramiko.SSHClient:
        with self._lock:
            client = self._clients.get((w.host, w.port))
        if client is not None and client.get_transport() and client.get_transport().is_active():
            return client
        client = self._connect(w)
        with self._lock:
            self._clients[(w.host, w.port)] = client
        return client

    def _connect(self, w: Worker) -> paramiko.SSHClient:
        name = w.host if w.port == 22 else f"[{w.host}]:{w.port}"
        delay = 1.0
        for attempt in range(self.retries + 1):
            client = paramiko.SSHClient()
            if w.host_keys:  # the VM vouched for its keys: accept exactly those
                for key_type, b64 in w.host_keys.items():
                    client.get_host_keys().add(name, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(b64)))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                if self.known_hosts.exists():
                    client.load_host_keys(str(self.known_hosts))
                client.set_missing_host_key_policy(_TrustOnFirstUse(self.known_hosts))
            try:
                client.connect(w.host, w.port, username=self.user, key_filename=str(self.key_file),
                               timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                               look_for_keys=False, allow_agent=False)
                client.get_transport().set_keepalive(KEEPALIVE_SEC)
                return client
            except paramiko.BadHostKeyException as e:
                raise LauncherError(
                    f"worker {w.index} ({w.host}): host key {e.key.get_name()} does not match the "
                    f"{'key the VM published' if w.host_keys else 'one in ' + str(self.known_hosts)}; refusing to connect"
                ) from None
            except paramiko.SSHException as e:
                if "not found in known_hosts" in str(e) or isinstance(e, paramiko.AuthenticationException):
                    raise LauncherError(f"worker {w.index} ({w.host}): {e}") from None
                error: Exception = e
            except OSError as e:
                error = e
            client.close()
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise ConnectionLost(f"worker {w.index} ({w.host}:{w.port}): cannot connect ({error})")

    def drop(self, w: Worker, client: paramiko.SSHClient | None = None) -> None:
        """Close and forget the worker's connection (only if it is still `client`, when given),
        so the next call opens a fresh one."""
        with self._lock:
            cached = self._clients.get((w.host, w.port))
            if cached is None or (client is not None and cached is not client):
                return
            del self._clients[(w.host, w.port)]
        try:
            cached.close()
        except Exception:  # noqa: BLE001 - it is broken already; closing is best effort
            pass

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> "Connections":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_print_lock = threading.Lock()


def emit(label: str, line: str) -> None:
    """One output line of a worker, `[wK] ...`; whole lines only, even from many threads."""
    with _print_lock:
        print(f"[{label}] {line}", flush=True)


def run(conns: Connections, w: Worker, command: str, on_line: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None, idle_timeout: float | None = None, stdin: bytes | None = None) -> int:
    """Run `command` (a shell string) on one worker, streaming its combined output line by line
    (to `on_line`, or to stdout prefixed with `[wK]`). `stdin` is sent as the command's input (a
    file's content travels as data, never inside the command).

    With `idle_timeout` (a watched stream, for a command that writes a heartbeat to stderr while
    it runs): stdout alone is the output, stderr only shows that the connection is alive. No data
    on either for `idle_timeout` seconds, or the connection closing under the command (no exit
    status), drops the worker's connection and raises ConnectionLost; only complete lines are
    passed on (a last line without a newline is not), so a caller can count what it got."""
    sink = on_line or (lambda line: emit(w.label, line))
    if idle_timeout is None:
        chan = conns.client(w).get_transport().open_session()
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
            chan.shutdown_write()
    else:
        client = conns.client(w)
        try:
            chan = client.get_transport().open_session()
            chan.exec_command(command)
        except (*TRANSPORT_ERRORS, AttributeError) as e:  # AttributeError: no transport any more
            conns.drop(w, client)
            raise ConnectionLost(f"cannot start the command: {e or type(e).__name__}") from None
    chan.settimeout(0.2)
    pending = b""
    heard = time.monotonic()
    # Read to EOF, not to the exit status: sshd may report the exit before the last output.
    while True:
        if cancel is not None and cancel.is_set():
            chan.close()
            return 130
        if idle_timeout is not None:
            while chan.recv_stderr_ready() and chan.recv_stderr(65536):
                heard = time.monotonic()  # a heartbeat: proof of life, not output
        try:
            data = chan.recv(65536)
        except socket.timeout:
            if idle_timeout is not None and time.monotonic() - heard > idle_timeout:
                conns.drop(w, client)
                raise ConnectionLost(f"no output or heartbeat for {idle_timeout:g}s") from None
            continue
        if not data:
            break
        heard = time.monotonic()
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            sink(raw.decode(errors="replace").rstrip("\r"))
    if idle_timeout is None:
        if pending:
            sink(pending.decode(errors="replace").rstrip("\r"))
        return chan.recv_exit_status()
    # EOF: the command's end (an exit status follows), or the connection's (none ever comes).
    deadline = time.monotonic() + idle_timeout
    while not chan.exit_status_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    if chan.exit_status_ready() and chan.exit_status != -1:
        return chan.exit_status
    transport = client.get_transport()
    if transport is None or not transport.is_active() or not chan.exit_status_ready():
        conns.drop(w, client)
        raise ConnectionLost("the connection closed")
    raise ConnectionLost("the command ended without an exit status")


def capture(conns: Connections, w: Worker, command: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run `command` on one worker (with `stdin` as its input) and return (exit code, output)."""
    lines: list[str] = []
    code = run(conns, w, command, on_line=lines.append, stdin=stdin)
    return code, "\n".join(lines)


def fan_out(workers: list[Worker], fn: Callable[[Worker], T]) -> dict[int, T]:
    """fn(worker) on every worker in parallel; results by worker index."""
    with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
        futures = {w.index: pool.submit(fn, w) for w in workers}
        return {i: f.result() for i, f in futures.items()}


def exec_all(conns: Connections, workers: list[Worker], command: str, fail_fast: bool = False) -> int:
    """Run `command` on every worker at once; the exit code is the worst worker's. With
    `fail_fast`, the first failure stops the others and its code is the result."""
    cancel = threading.Event()
    first_failure: list[int] = []

    def one(w: Worker) -> int:
        code = run(conns, w, command, cancel=cancel)
        if code and fail_fast and not cancel.is_set():
            first_failure.append(code)
            cancel.set()
        return code

    codes = fan_out(workers, one)
    return first_failure[0] if first_failure else max(codes.values(), default=0)

