"""Real OpenSSH sshd processes that stand in for TPU VM workers in end-to-end tests.

Why real sshd: the launcher talks to TPU VMs over SSH (host-key checks, exec, file sync, detached
processes). Faking the protocol would test the fake; a real `/usr/sbin/sshd` per "VM" tests the
launcher against the same server it meets on Cloud TPU.

Each `SshHost` is one sshd listening on 127.0.0.N (N >= 2, any 127/8 address works on Linux with no
setup) inside its own namespaces, made with `unshare --mount --propagation private --pid --fork
--mount-proc --uts`:

- mount: the directories a VM owns are private to the host, so two hosts do not see each other's
  files, nor does the machine running the tests see theirs:
  * `/root` (the remote home; user root) is an overlay whose lower layer is the real `/root`
    (read-only in effect, so `/root/.pyenv` and the test interpreter stay usable) and whose upper
    layer is a per-host tmpfs: writes land in the host only.
  * `/tmp`, `/var/tmp`, `/dev/shm` and `/run` are fresh per-host tmpfs directories...
  * ...except for the `visible_paths` (a constructor argument) that sit under one of them: each is
    bind-mounted, read-only, at the same path inside the host's fresh directory, so a host sees
    the test machine's copy there and nothing else of the real `/tmp` (etc.). The default,
    `interpreter_paths()`, is what `REMOTE_PYTHON` needs to run: `sys.prefix`, `sys.exec_prefix`,
    `sys.base_prefix`, `sys.base_exec_prefix`, and the directory of every hop of the symlink
    chain of `sys.executable` (a venv's `bin/python` -> the base interpreter), down to the real
    file. So a checkout with its venv under /tmp (`git clone ... /tmp/x && python3 -m venv
    /tmp/x/.venv`) works like one under /work. The checkout itself is NOT exposed, on purpose:
    workers run the code the launcher syncs into their own /root (`~/mllm-jax`), and the
    editable install's finder (which maps `mllm_jax` to the checkout) must not let them import
    the test machine's copy instead; nor is the shared data dir next to it (tests copy data to a
    shared directory outside the private ones, e.g. /srv, as test_launch's bucket does). Paths
    under `/root` need no mount (the overlay already shows the real files) and paths outside the
    private dirs are shared anyway; both are left alone. A symlink is followed: the real target
    is mounted at its own path and at the path given. Read-only (keeping the source's
    nosuid/nodev/noexec) because the real directory is shared by every host and the test
    machine: a host cannot install into or delete from the test interpreter (Python just skips
    writing `__pycache__` there; a host's own `python -m venv`, pip and its cache in ~/.cache
    work in its /root or /tmp as usual). Binds are not recursive: mounts below a visible
    directory on the test machine are not carried over.
  * Everything else (`/usr`, `/etc`, `/work`, the repository when it is not under a private
    dir) is the test machine's, shared.
  * `/etc/hosts` is the machine's plus a line naming the host's own address, so its hostname
    resolves (gloo, under jax.distributed on CPU, needs that).
  Nothing is mounted on the test machine itself: the mounts exist only inside the namespace, which
  the kernel tears down when its last process exits.
- pid: processes started over SSH (including detached `nohup ... &` ones) see only their host's
  processes (a remote `pkill` cannot hit the test runner), and all of them die with the host's
  sshd, like on a VM that is deleted.
- uts: each host has its own hostname.
The network is NOT private: a port opened on host A (e.g. the jax.distributed coordinator) is
reachable from host B at host A's IP, as on a TPU slice.

Remote commands: use `host.python` (== `REMOTE_PYTHON`, the absolute path of the interpreter that
runs the tests, so it has jax and the project's dependencies installed; with the default
`visible_paths` it runs on every host wherever it lives). `python3` on the remote PATH also works:
sshd's `SetEnv PATH=` puts the directory of that interpreter first; but the login shell (bash, which
on Debian sources `~/.bashrc` for ssh commands) may change PATH again, so absolute paths are safer.

Each host's files live in `host.state_dir` on the test machine, which the host sees as
`/run/mllm-sshd` (`REMOTE_STATE_DIR`): `sshd_config`, the host key, `authorized_keys.<user>`
(`AuthorizedKeysFile`; `~/.ssh/authorized_keys` is NOT consulted; root's, plus one per account
`add_user` made in the host's private /etc/passwd, /etc/group and /home), `sshd.pid` and `sshd.log`
(sshd's stderr, `-D -e`; read it with `host.log_text()`). stop() deletes the directory.

Requires root with CAP_SYS_ADMIN (mount namespaces, tmpfs and overlay mounts), util-linux `unshare`
and `mount`, and openssh-server (`apt-get install -y openssh-server`). Anything missing raises
`HarnessUnavailable`; nothing is skipped silently.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

SSHD = "/usr/sbin/sshd"
DEFAULT_FIRST_IP = "127.0.0.2"
DEFAULT_PORT = 22
REMOTE_STATE_DIR = "/run/mllm-sshd"
REMOTE_PYTHON = sys.executable
PRIVATE_DIRS = ("/root", "/tmp", "/var/tmp", "/dev/shm", "/run")
# The private dirs that are fresh tmpfs directories, and their names inside the host's tmpfs `fs`
# (where visible paths get their mount points before the directory covers the real one).
_TMPFS_DIRS = {"/tmp": "tmp", "/var/tmp": "vartmp", "/dev/shm": "shm", "/run": "run"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SETUP_FAILED = 97  # exit status of the namespace setup script, so start() can name the cause

# Runs as the first process of the new namespaces (argv: state dir, hostname, sshd, REMOTE_STATE_DIR,
# then one (source, target, options) triple per visible path), then becomes sshd (PID 1 of the host).
# Every path after `cd` is relative and `mount -c` passes it to the kernel as is, so the setup works
# wherever the state dir lives, even under a directory it is about to cover (/tmp, /root, ...).
# Visible paths are bound first, while their absolute sources still name the test machine's files;
# their targets lie inside the tmpfs (`tmp/...` for /tmp/...), and the private dirs are put in place
# with `--rbind`, which carries those binds along. Paths only ever travel as arguments.
_SETUP_SCRIPT = r"""
set -u
fail() { echo "sshd harness: $*" >&2; exit 97; }
cd "$1" || fail "cannot enter state dir $1"
echo "$2" > /proc/sys/kernel/hostname || fail "cannot set hostname (uts namespace)"
sshd=$3 config=$4/sshd_config
shift 4
mount -c -t tmpfs -o mode=0755 mllm-vm fs || fail "cannot mount a tmpfs (needs root with CAP_SYS_ADMIN)"
(cd fs && mkdir root.upper root.work tmp vartmp shm run run/sshd run/mllm-sshd && chmod 1777 tmp vartmp shm) \
  || fail "mkdir in the tmpfs failed"
mount -c --bind . fs/run/mllm-sshd || fail "cannot bind the state dir"
mount -c --bind hosts /etc/hosts || fail "cannot bind a private /etc/hosts"
mount -c --bind passwd /etc/passwd || fail "cannot bind a private /etc/passwd"
mount -c --bind group /etc/group || fail "cannot bind a private /etc/group"
mount -c --bind homes /home || fail "cannot bind a private /home"
cd fs || fail "cannot enter the tmpfs"
while [ $# -ge 3 ]; do
  if [ -d "$1" ]; then
    mkdir -p -- "$2" || fail "cannot make a mount point for visible path $1"
  else  # a file: make its parents, then an empty file to mount on
    { mkdir -p -- "$2" && rmdir -- "$2" && : > "$2"; } || fail "cannot make a mount point for visible path $1"
  fi
  mount -c --bind -- "$1" "$2" || fail "cannot bind visible path $1"
  mount -c -o "remount,bind,$3" -- "$2" || fail "cannot make visible path $1 read-only"
  shift 3
done
mount -c -t overlay overlay -o lowerdir=/root,upperdir=root.upper,workdir=root.work /root \
  || fail "cannot mount an overlay on /root (kernel overlayfs support needed)"
mount -c --rbind run /run || fail "cannot bind /run"
mount -c --rbind vartmp /var/tmp || fail "cannot bind /var/tmp"
mount -c --rbind shm /dev/shm || fail "cannot bind /dev/shm"
mount -c --rbind tmp /tmp || fail "cannot bind /tmp"
cd /
exec "$sshd" -D -e -f "$config"
"""


def interpreter_paths() -> tuple[str, ...]:
    """The default `visible_paths`: what `REMOTE_PYTHON` needs to start and import its packages.

    - `sys.prefix`, `sys.exec_prefix`: a venv's own tree (its `bin/`, `pyvenv.cfg`, site-packages).
    - `sys.base_prefix`, `sys.base_exec_prefix`: the interpreter the venv was made from (stdlib,
      libpython, its site-packages when the venv includes system site-packages).
    - the directory of each hop of `sys.executable`'s symlink chain (`.venv/bin/python3` ->
      `python3.11` -> `/usr/bin/python3.11`), down to the real file, so the path a host is told to
      run resolves there as it does here.
    A directory that is itself a private dir (an interpreter at /tmp/python3) cannot be exposed
    without making that dir shared; the file is exposed instead. Most of these paths are not
    under a private dir at all, and need no mount.
    """
    paths = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    hop = os.path.abspath(sys.executable)
    for _ in range(40):  # the kernel's own limit on symlink hops
        paths.append(os.path.dirname(hop) if os.path.dirname(hop) not in PRIVATE_DIRS else hop)
        if not os.path.islink(hop):
            break
        hop = os.path.abspath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    real = os.path.realpath(sys.executable)
    paths.append(os.path.dirname(real) if os.path.dirname(real) not in PRIVATE_DIRS else real)
    return tuple(dict.fromkeys(p for p in paths if p and p not in PRIVATE_DIRS and os.path.exists(p)))


class HarnessUnavailable(RuntimeError):
    """The machine cannot run the harness (not root, no unshare/sshd, mounts refused)."""


class SshdStartError(RuntimeError):
    """An sshd did not come up; the message carries its log."""


@dataclass(frozen=True)
class ClientKey:
    """An ed25519 client key pair on disk, as a test user's ~/.ssh/id_ed25519 would be."""

    private_key_path: Path
    public_line: str  # "ssh-ed25519 AAAA... comment", what goes into authorized_keys

    @property
    def public_key_b64(self) -> str:
        return self.public_line.split()[1]


def make_client_key(directory: str | os.PathLike[str], name: str = "id_ed25519",
                    comment: str = "mllm-test-client") -> ClientKey:
    """Make an unencrypted ed25519 key pair with ssh-keygen (OpenSSH format; paramiko and ssh read it)."""
    check_supported(need_root=False)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _keygen(path, comment)
    return ClientKey(private_key_path=path, public_line=path.with_name(name + ".pub").read_text().strip())


def check_supported(need_root: bool = True) -> None:
    """Raise HarnessUnavailable naming what is missing, so tests fail loudly instead of skipping."""
    missing = [tool for tool in ("ssh-keygen",) + (("unshare", "mount") if need_root else ())
               if shutil.which(tool) is None]
    if need_root and not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        raise HarnessUnavailable(f"sshd harness needs {', '.join(missing)}: apt-get install -y openssh-server "
                                 "util-linux mount")
    if need_root and os.geteuid() != 0:
        raise HarnessUnavailable("sshd harness must run as root (it creates mount namespaces and mounts)")


def known_hosts_line(ip: str, port: int, key_type: str, key_b64: str) -> str:
    """One known_hosts line; OpenSSH writes a non-22 port as [ip]:port."""
    return f"{ip if port == 22 else f'[{ip}]:{port}'} {key_type} {key_b64}"


class SshHost:
    """One sshd in private namespaces acting as one TPU VM worker at 127.0.0.N:port.

    The constructor leases the IP and writes the host key and config; `start()` launches sshd and
    waits until it listens; `stop()` kills every process of the host and removes
    its files. Use it as a context manager (or always call stop()). A stopped host cannot restart.
    """

    def __init__(self, ip: str | None = None, *, port: int = DEFAULT_PORT, first_ip: str = DEFAULT_FIRST_IP,
                 hostname: str | None = None, base_dir: str | os.PathLike[str] | None = None,
                 log_level: str = "VERBOSE", start_timeout: float = 10.0,
                 extra_config: Sequence[str] = (),
                 visible_paths: Sequence[str | os.PathLike[str]] | None = None) -> None:
        """`visible_paths`: files or directories of the test machine the host sees at the same
        path, read-only, even under its private /tmp, /var/tmp, /dev/shm or /run (see the module
        docstring). None means `interpreter_paths()`; a list replaces it, so pass
        `[*interpreter_paths(), extra]` to add to it. Each must exist; a private dir itself
        (e.g. "/tmp") is refused, since exposing it would make it shared."""
        check_supported()
        self._visible_mounts = _visible_mounts(interpreter_paths() if visible_paths is None else visible_paths)
        self._port = port
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._mnt_ns: str | None = None
        self._stopped = False
        self._lease = _IpLease.acquire(ip, first_ip, port)
        try:
            self._hostname = hostname or f"sshd-harness-{self._lease.ip.replace('.', '-')}"
            self._state = Path(tempfile.mkdtemp(prefix=f"sshd-{self._lease.ip}-", dir=base_dir)).resolve()
            (self._state / "fs").mkdir()  # mount point of the host's tmpfs, inside the namespace only
            key = self._state / "ssh_host_ed25519_key"
            _keygen(key, f"root@{self._hostname}")
            self._host_public_key_line = key.with_name(key.name + ".pub").read_text().strip()
            self.authorized_keys_path.touch(mode=0o600)
            self._write_config(log_level, extra_config)
            # The host's name resolves to its address, as on a VM (gloo, used by jax.distributed
            # on CPU, looks its own hostname up to pick the interface it listens on).
            (self._state / "hosts").write_text(Path("/etc/hosts").read_text() + f"{self.ip} {self._hostname}\n")
            # Accounts other than root (`add_user`, as OS Login's NSS module makes them) live in a
            # private /etc/passwd, /etc/group and /home; sshd reads each user's keys as that user.
            for name in ("passwd", "group"):
                shutil.copy(f"/etc/{name}", self._state / name)
            (self._state / "homes").mkdir()
            self._state.chmod(0o711)
        except BaseException:
            self._lease.release()
            if hasattr(self, "_state"):
                shutil.rmtree(self._state, ignore_errors=True)
            raise

    # --- identity, as the launcher would learn it from the TPU API and guest attributes ---
    @property
    def ip(self) -> str:
        return self._lease.ip

    @property
    def port(self) -> int:
        return self._port

    @property
    def hostname(self) -> str:
        return self._hostname

    @property
    def host_public_key_line(self) -> str:
        """'ssh-ed25519 AAAA... root@host', the content of the host's ssh_host_ed25519_key.pub."""
        return self._host_public_key_line

    @property
    def host_key_type(self) -> str:
        return self._host_public_key_line.split()[0]

    @property
    def host_key_b64(self) -> str:
        """The base64 key alone, as the GCE guest agent publishes it (guest attribute hostkeys/ssh-ed25519)."""
        return self._host_public_key_line.split()[1]

    @property
    def host_key_bytes(self) -> bytes:
        return base64.b64decode(self.host_key_b64)

    @property
    def known_hosts_line(self) -> str:
        return known_hosts_line(self.ip, self.port, self.host_key_type, self.host_key_b64)

    # --- files and interpreter ---
    @property
    def python(self) -> str:
        """Absolute interpreter path for remote commands: the test runner's own, which has jax."""
        return REMOTE_PYTHON

    @property
    def visible_mounts(self) -> list[tuple[str, str]]:
        """(test-machine path, path on the host) of each visible path that needed a mount."""
        return [(m.source, m.host_path) for m in self._visible_mounts]

    @property
    def state_dir(self) -> Path:
        """This host's files on the test machine; the host sees them at REMOTE_STATE_DIR."""
        return self._state

    @property
    def authorized_keys_path(self) -> Path:
        """root's AuthorizedKeysFile on the test machine (REMOTE_STATE_DIR/authorized_keys.root inside)."""
        return self._state / "authorized_keys.root"

    @property
    def log_path(self) -> Path:
        return self._state / "sshd.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def authorize(self, public_key_line: str, user: str = "root") -> None:
        """Let the holder of this public key log in as `user` (root, or one `add_user` made; sshd
        rereads the file per login)."""
        line = public_key_line.strip()
        if not line or "\n" in line:
            raise ValueError("authorize() takes exactly one public key line")
        path = self._state / f"authorized_keys.{user}"
        if user != "root" and not path.exists():
            raise ValueError(f"no user {user!r} on {self!r}: add_user() first")
        with path.open("a") as f:
            f.write(line + "\n")

    def add_user(self, name: str, uid: int, home: str) -> None:
        """An account as OS Login's NSS module would make it: a passwd and group entry, a home
        (`home` under /home, owned by it) and an empty authorized_keys, readable by it only."""
        if not home.startswith("/home/") or "/" in home[len("/home/"):] or not name.replace("_", "").isalnum():
            raise ValueError(f"add_user({name!r}, {home!r}): expected a plain name and /home/<dir>")
        with (self._state / "passwd").open("a") as f:
            f.write(f"{name}:x:{uid}:{uid}::{home}:/bin/sh\n")
        with (self._state / "group").open("a") as f:
            f.write(f"{name}:x:{uid}:\n")
        path = self._state / "homes" / home[len("/home/"):]
        path.mkdir(mode=0o700)
        os.chown(path, uid, uid)
        keys = self._state / f"authorized_keys.{name}"
        keys.touch(mode=0o600)
        os.chown(keys, uid, uid)

    def users(self) -> list[str]:
        """The accounts `add_user` made."""
        return sorted(p.name.split(".", 1)[1] for p in self._state.glob("authorized_keys.*") if p.name != "authorized_keys.root")

    # --- lifecycle ---
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SshHost:
        """Launch sshd and wait (bounded) until it listens on ip:port."""
        self._launch()
        self._wait_ready()
        return self

    @property
    def root(self) -> Path:
        """This host's file system seen from the test machine (through its `unshare` process,
        which lives as long as the host: any other process, even the lowest PID, may be gone)."""
        return Path(f"/proc/{self._proc.pid}/root")

    def pids(self) -> list[int]:
        """Test-machine PIDs of every process inside this host (sshd, sessions, detached jobs)."""
        if self._mnt_ns is None:
            return []
        return _pids_in_mount_ns(self._mnt_ns)

    def stop(self, grace: float = 5.0) -> None:
        """Kill every process of the host (the namespace and its mounts go with them), delete its
        files. sshd gets `grace` seconds after SIGTERM; 0: SIGKILL at once, as a machine that dies."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._proc is not None:
                self._kill_all(grace)
        finally:
            self._lease.release()
            shutil.rmtree(self._state, ignore_errors=True)

    def __enter__(self) -> SshHost:
        if self._proc is None:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SshHost({self.ip}:{self.port}, {self.hostname}, running={self.running})"

    # --- internals ---
    def _write_config(self, log_level: str, extra_config: Sequence[str]) -> None:
        remote_path = f"{os.path.dirname(REMOTE_PYTHON)}:{DEFAULT_PATH}"
        lines = [
            f"ListenAddress {self.ip}:{self.port}",
            "AddressFamily inet",
            f"HostKey {REMOTE_STATE_DIR}/ssh_host_ed25519_key",
            f"PidFile {REMOTE_STATE_DIR}/sshd.pid",
            f"AuthorizedKeysFile {REMOTE_STATE_DIR}/authorized_keys.%u",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",  # Debian's PAM stack (pam_loginuid) fails in containers; root has no password
            "StrictModes no",  # the state dir may sit under a world-writable /tmp on the test machine
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",  # scp/sftp without depending on sftp-server's path
            "MaxStartups 200",  # a launcher opens many connections at once
            "MaxSessions 100",
            f'SetEnv PATH="{remote_path}"',
            f"LogLevel {log_level}",
            *extra_config,
        ]
        (self._state / "sshd_config").write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        if self._stopped:
            raise RuntimeError(f"{self!r} was stopped; make a new SshHost")
        if self._proc is not None:
            raise RuntimeError(f"{self!r} already started")
        cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
               "--mount-proc", "--uts", "sh", "-c", _SETUP_SCRIPT, "sshd-harness-setup",
               str(self._state), self._hostname, SSHD, REMOTE_STATE_DIR,
               *(arg for m in self._visible_mounts for arg in (m.source, m.target, m.options))]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, close_fds=True)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                log = self.log_text()
                if rc == _SETUP_FAILED or log.startswith("unshare:") or "\nunshare:" in log:
                    self._fail(f"could not set up its namespaces/mounts (exit {rc}); the harness needs root "
                               "with CAP_SYS_ADMIN (in Docker: --privileged) and overlayfs", HarnessUnavailable)
                self._fail(f"exited with status {rc}")
            if _listening(self.ip, self.port):
                break
            if time.monotonic() > deadline:
                self._fail(f"did not answer on {self.ip}:{self.port} within {self._start_timeout:.0f}s")
            time.sleep(0.02)
        self._mnt_ns = os.readlink(f"/proc/{self._proc.pid}/ns/mnt")
        if self._mnt_ns == os.readlink("/proc/self/ns/mnt"):  # unshare has run once sshd answers
            self._fail("is not in its own mount namespace")

    def _fail(self, why: str, error: type[RuntimeError] = SshdStartError) -> NoReturn:
        log = self.log_text().strip()
        self.stop()
        raise error(f"sshd for {self.ip}:{self.port} {why}.\n--- sshd log (setup errors included) ---\n{log}")

    def _kill_all(self, grace: float) -> None:
        proc = self._proc
        assert proc is not None
        ns = self._mnt_ns or _try_readlink(f"/proc/{proc.pid}/ns/mnt")
        own_ns = os.readlink("/proc/self/ns/mnt")
        # sshd is PID 1 of the host's pid namespace: when it dies the kernel kills the rest.
        with _suppress_missing():
            os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=max(grace, 5))
        except subprocess.TimeoutExpired:
            with _suppress_missing():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if ns is None or ns == own_ns:
            return
        deadline = time.monotonic() + 5
        while left := _pids_in_mount_ns(ns):
            for pid in left:
                with _suppress_missing():
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} of {self.ip} survived SIGKILL")
            time.sleep(0.02)


class SshCluster:
    """k SshHosts started together, like the workers of one TPU slice (hosts[i] is worker i).

    IPs are the lowest free ones from first_ip up; a lock file per IP keeps concurrent tests
    (threads or processes) from taking the same one.
    """

    def __init__(self, num_hosts: int, *, first_ip: str = DEFAULT_FIRST_IP, port: int = DEFAULT_PORT,
                 base_dir: str | os.PathLike[str] | None = None,
                 visible_paths: Sequence[str | os.PathLike[str]] | None = None, **host_kwargs: object) -> None:
        """`visible_paths` and `host_kwargs` go to every SshHost (None: `interpreter_paths()`)."""
        if num_hosts < 1:
            raise ValueError("num_hosts must be >= 1")
        self.hosts: list[SshHost] = []
        try:
            for _ in range(num_hosts):
                self.hosts.append(SshHost(first_ip=first_ip, port=port, base_dir=base_dir,
                                          visible_paths=visible_paths, **host_kwargs))  # type: ignore[arg-type]
        except BaseException:
            self.stop()
            raise

    @property
    def ips(self) -> list[str]:
        return [h.ip for h in self.hosts]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[SshHost]:
        return iter(self.hosts)

    def __getitem__(self, i: int) -> SshHost:
        return self.hosts[i]

    def authorize(self, public_key_line: str) -> None:
        for h in self.hosts:
            h.authorize(public_key_line)

    def known_hosts_text(self) -> str:
        return "".join(h.known_hosts_line + "\n" for h in self.hosts)

    def write_known_hosts(self, path: str | os.PathLike[str]) -> Path:
        """A known_hosts file for all hosts (for `ssh -o UserKnownHostsFile=...` or paramiko)."""
        p = Path(path)
        p.write_text(self.known_hosts_text())
        return p

    def start(self) -> SshCluster:
        """Launch all sshds first, then wait for each, so k hosts start in about the time of one."""
        try:
            for h in self.hosts:
                h._launch()
            for h in self.hosts:
                h._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        errors = []
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:  # stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> SshCluster:
        if not any(h._proc is not None for h in self.hosts):  # start_cluster() already started it
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(num_hosts: int, **kwargs: object) -> SshCluster:
    """SshCluster(num_hosts, **kwargs).start(); stop() it (or use it in a `with`)."""
    return SshCluster(num_hosts, **kwargs).start()  # type: ignore[arg-type]


# --- helpers ---

class _IpLease:
    """An exclusive claim on one loopback IP: a flock on a per-IP file, dropped by release() or process exit."""

    _LOCK_DIR = Path(tempfile.gettempdir()) / "mllm-sshd-harness-locks"

    def __init__(self, ip: str, fd: int) -> None:
        self.ip = ip
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, ip: str | None, first_ip: str, port: int) -> _IpLease:
        if ip is not None:
            lease = cls._try(ip, port)
            if isinstance(lease, str):
                raise HarnessUnavailable(f"cannot use {ip}:{port}: {lease}")
            return lease
        start = ipaddress.IPv4Address(first_ip)
        if not start.is_loopback or int(start) & 0xFF in (0, 1, 255):
            raise ValueError(f"first_ip must be a loopback address 127.x.y.N with N in 2..254, got {first_ip}")
        reasons: list[str] = []
        candidate = start
        while candidate.is_loopback and len(reasons) < 1024:
            if int(candidate) & 0xFF not in (0, 1, 255):
                lease = cls._try(str(candidate), port)
                if isinstance(lease, _IpLease):
                    return lease
                reasons.append(f"{candidate}: {lease}")
            candidate += 1
        raise HarnessUnavailable(f"no free loopback IP from {first_ip} for port {port}: " + "; ".join(reasons[-3:]))

    @classmethod
    def _try(cls, ip: str, port: int) -> _IpLease | str:
        cls._LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(cls._LOCK_DIR / f"{ip}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return "leased by another test"
        with socket.socket() as s:  # something outside the harness (a system sshd on 0.0.0.0:22?)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError as e:
                os.close(fd)
                return f"port in use ({errno.errorcode.get(e.errno or 0, e)})"
        return cls(ip, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class _VisibleMount:
    source: str  # the real path on the test machine (symlinks resolved)
    host_path: str  # where the host sees it (absolute, under a fresh-tmpfs private dir)
    options: str  # for the read-only remount: "ro" plus the source's nosuid/nodev/noexec flags

    @property
    def target(self) -> str:
        """host_path inside the host's tmpfs, relative to it, as the setup script mounts it."""
        top = _private_dir_of(self.host_path)
        assert top is not None
        return _TMPFS_DIRS[top] + self.host_path[len(top):]


def _private_dir_of(path: str) -> str | None:
    """The private directory that is `path` or contains it, if any."""
    return next((d for d in PRIVATE_DIRS if _is_within(path, d)), None)


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _visible_mounts(paths: Sequence[str | os.PathLike[str]]) -> list[_VisibleMount]:
    """The bind mounts that make `paths` visible on a host: one at each path's real location and
    one at the path as given (when a symlink makes them differ), both from the real one, for those
    under a fresh-tmpfs private dir; none for a path inside another mount (the outer bind shows it
    as the test machine does)."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("visible_paths takes a sequence of paths, not one path")
    wanted: dict[str, str] = {}
    for p in paths:
        given = os.path.abspath(os.fspath(p))
        if not os.path.lexists(given):
            raise ValueError(f"visible path {given!r} does not exist")
        real = os.path.realpath(given)
        if not os.path.exists(real):
            raise ValueError(f"visible path {given!r} is a dangling symlink (to {real!r})")
        for host_path in dict.fromkeys((real, given)):
            top = _private_dir_of(host_path)
            if top is None or top == "/root":  # shared anyway / shown by the /root overlay
                continue
            if host_path == top:
                raise ValueError(f"visible path {given!r} would expose all of {top}, which is private to "
                                 "each host; name the directories under it that hosts need")
            if _is_within(host_path, REMOTE_STATE_DIR):
                raise ValueError(f"visible path {given!r} is under {REMOTE_STATE_DIR}, the host's own state dir")
            wanted.setdefault(host_path, real)
    mounts: list[_VisibleMount] = []
    for host_path in sorted(wanted):  # a directory sorts before everything under it
        if any(_is_within(host_path, m.host_path) for m in mounts):
            continue
        mounts.append(_VisibleMount(wanted[host_path], host_path, _readonly_options(wanted[host_path])))
    return mounts


def _readonly_options(path: str) -> str:
    """"ro" plus the restrictions the source's mount has, which a bind remount would otherwise drop."""
    flags = os.statvfs(path).f_flag
    kept = [name for bit, name in ((os.ST_NOSUID, "nosuid"), (os.ST_NODEV, "nodev"), (os.ST_NOEXEC, "noexec"))
            if flags & bit]
    return ",".join(["ro", *kept])


def _keygen(path: Path, comment: str) -> None:
    r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed for {path}: {r.stderr.strip()}")


def _listening(ip: str, port: int) -> bool:
    """True once some socket listens on ip:port (read from /proc/net/tcp: a probe connection would
    leave a 'Connection reset' line in every sshd log)."""
    want = f"{socket.htonl(int(ipaddress.IPv4Address(ip))):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[1] == want and fields[3] == "0A" for fields in map(str.split, f))


def _try_readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _pids_in_mount_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _try_readlink(f"/proc/{entry}/ns/mnt") == ns:
            pids.append(int(entry))
    return pids


def _suppress_missing() -> contextlib.suppress:
    """Ignore ProcessLookupError: the process may already be gone."""
    return contextlib.suppress(ProcessLookupError)
