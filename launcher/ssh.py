"""SSH to every worker of a TPU VM with paramiko: verified host keys, one reused connection per
worker, keepalives, connect retries, and parallel fan-out with `[wK]`-prefixed output."""

from __future__ import annotations

import base64
import os
import re
import shlex
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import paramiko

from launcher.errors import Interrupted, LauncherError

T = TypeVar("T")
KEEPALIVE_SEC = 15


@dataclass
class Worker:
    index: int
    host: str
    port: int = 22
    host_keys: dict[str, str] = field(default_factory=dict)
    """Key type -> base64 key, as the VM published them (guest attributes); empty = unknown."""
    pins: Path | None = None
    """With no published keys: the node's pin file, where this worker's key is kept on first use
    (per node id and worker, not per address); None = the launcher's known_hosts by address."""

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
    """No published key: remember the first one seen, in the worker's pin file (as `wK TYPE
    KEY`) or, without one, in the launcher's own known_hosts."""

    def __init__(self, path: Path, label: str | None = None):
        self.path, self.label = path, label

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.label is None:
            client.save_host_keys(str(self.path))
            return
        with _print_lock, self.path.open("a") as f:
            f.write(f"{self.label} {key.get_name()} {key.get_base64()}\n")


def pinned(path: Path, label: str) -> dict[str, str]:
    """Key type -> base64 key pinned for one worker (`wK`) in a pin file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {parts[1]: parts[2] for parts in (line.split() for line in lines) if len(parts) == 3 and parts[0] == label}


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

    def __init__(self, user: str, key_file: Path, known_hosts: Path, retries: int = 4, timeout: float = 20,
                 auth_wait: float = 0.0, proxy: str | None = None, refused_hint: str = ""):
        """`auth_wait`: seconds a refused login is tried again (a key just added to the node's
        metadata takes the guest agent a while), then one line with `refused_hint`. `proxy`: an
        OpenSSH-style ProxyCommand (`%h`, `%p`, `%r`) the connection goes through."""
        self.user, self.key_file, self.known_hosts = user, key_file, known_hosts
        self.retries, self.timeout = retries, timeout
        self.auth_wait, self.proxy, self.refused_hint = auth_wait, proxy, refused_hint
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
        delay, attempt, refused_since = 1.0, 0, None
        while True:
            client = paramiko.SSHClient()
            trusted = w.host_keys or (pinned(w.pins, w.label) if w.pins else {})
            if trusted:  # the VM vouched for these keys (or we pinned them): accept exactly those
                for key_type, b64 in trusted.items():
                    client.get_host_keys().add(name, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(b64)))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            elif w.pins:
                client.set_missing_host_key_policy(_TrustOnFirstUse(w.pins, w.label))
            else:
                if self.known_hosts.exists():
                    client.load_host_keys(str(self.known_hosts))
                client.set_missing_host_key_policy(_TrustOnFirstUse(self.known_hosts))
            try:
                sock = paramiko.ProxyCommand(self._proxy_command(w)) if self.proxy else None
                client.connect(w.host, w.port, username=self.user, key_filename=str(self.key_file),
                               timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                               look_for_keys=False, allow_agent=False, sock=sock)
                client.get_transport().set_keepalive(KEEPALIVE_SEC)
                return client
            except paramiko.BadHostKeyException as e:
                where = ("key the VM published" if w.host_keys else f"key pinned on first use in {w.pins}" if w.pins
                         else f"one in {self.known_hosts}")
                raise LauncherError(f"worker {w.index} ({w.host}): host key {e.key.get_name()} does not match the "
                                    f"{where}; refusing to connect") from None
            except paramiko.AuthenticationException as e:
                client.close()
                refused_since = refused_since or time.monotonic()
                waited = time.monotonic() - refused_since
                if waited >= self.auth_wait:
                    raise LauncherError(f"worker {w.index} ({w.host}): login as {self.user} refused"
                                        f"{f' for {waited:.0f}s' if self.auth_wait else ''} ({e})"
                                        f"{': ' + self.refused_hint if self.refused_hint else ''}") from None
                time.sleep(min(delay, 10.0, max(0.1, self.auth_wait - waited)))
                delay *= 2
                continue
            except paramiko.SSHException as e:
                if "not found in known_hosts" in str(e):
                    raise LauncherError(f"worker {w.index} ({w.host}): {e}") from None
                error: Exception = e
            except OSError as e:
                error = e
            client.close()
            if attempt >= self.retries:
                raise ConnectionLost(f"worker {w.index} ({w.host}:{w.port}): cannot connect ({error})"
                                     f"{' through --ssh-proxy' if self.proxy else ''}")
            attempt += 1
            time.sleep(delay)
            delay *= 2

    def _proxy_command(self, w: Worker) -> str:
        """The ProxyCommand for a worker: `%h`, `%p`, `%r` as OpenSSH expands them (quoted: an
        address never becomes shell code), `%%` a percent sign."""
        values = {"h": shlex.quote(w.host), "p": str(w.port), "r": shlex.quote(self.user), "%": "%"}
        return re.sub(r"%([hpr%])", lambda m: values[m.group(1)], self.proxy or "")

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


def emit(label: str, line: str, raw: bool = False) -> None:
    """One output line of a worker, `[wK] ...`; whole lines only, even from many threads. Its
    control characters are shown escaped (readback.printable) unless `raw`."""
    from launcher.readback import printable

    with _print_lock:
        print(f"[{label}] {line if raw else printable(line)}", flush=True)


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
    if stdin is None:
        command = guarded(command)
    client = conns.client(w)
    if idle_timeout is None:
        chan = client.get_transport().open_session()
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
            chan.shutdown_write()
    else:
        try:
            chan = client.get_transport().open_session()
            chan.exec_command(command)
        except (*TRANSPORT_ERRORS, AttributeError) as e:  # AttributeError: no transport any more
            conns.drop(w, client)
            raise ConnectionLost(f"cannot start the command: {e or type(e).__name__}") from None
    try:
        return _read(conns, w, client, chan, sink, cancel, idle_timeout)
    finally:
        chan.close()  # its input closes: after an interrupt, that ends the command on the worker


def guarded(command: str) -> str:
    """`command` in its own process group on the worker, ended (TERM to the group) when the
    channel's input closes: the laptop closed the channel, was interrupted or killed, or its
    connection dropped. Without a pty, sshd signals nothing itself, so an interrupted install or
    `exec` would otherwise run on as an orphan. A job a command starts in a session of its own
    (`mllm launch`) is not in the group and goes on. The channel's input is kept on fd 3: an
    asynchronous command's stdin is /dev/null in a non-interactive shell."""
    return (f"exec 3<&0; setsid sh -c {shlex.quote(command)} </dev/null 3<&- & p=$!; "
            "(cat <&3 >/dev/null 2>&1; kill -TERM -$p || kill -TERM $p) >/dev/null 2>&1 & w=$!; exec 3<&-; "
            "wait $p; code=$?; kill $w 2>/dev/null; exit $code")


def _read(conns: Connections, w: Worker, client: paramiko.SSHClient, chan: paramiko.Channel,
          sink: Callable[[str], None], cancel: threading.Event | None, idle_timeout: float | None) -> int:
    chan.settimeout(0.2)
    pending = b""
    heard = time.monotonic()
    # Read to EOF, not to the exit status: sshd may report the exit before the last output.
    while True:
        if (cancel is not None and cancel.is_set()) or _interrupted.is_set():
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


_interrupted = threading.Event()
"""Set while an interrupted fan-out winds down: every command reading its output stops (which
ends it on its worker, see `guarded`) instead of running to its end."""


def fan_out(workers: list[Worker], fn: Callable[[Worker], T]) -> dict[int, T]:
    """fn(worker) on every worker in parallel; results by worker index. Interrupted (Ctrl-C in
    the main thread), it stops every worker's command before it raises."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(workers)))
    try:
        futures = {w.index: pool.submit(fn, w) for w in workers}
        return {i: f.result() for i, f in futures.items()}
    except (Interrupted, KeyboardInterrupt):
        _interrupted.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _interrupted.clear()


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

