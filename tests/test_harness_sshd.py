"""The sshd harness gives each fake TPU VM worker real SSH, its own host key and its own files.

These checks guard the assumptions the launcher's end-to-end tests build on: host-key pinning works
with the key the harness reports, remote commands find a Python with jax, files written on one
worker do not leak to another or to the test machine, an interpreter under the test machine's
/tmp runs on a worker without the rest of /tmp becoming shared, and stop() leaves no process behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from harness.sshd import (PRIVATE_DIRS, ClientKey, SshCluster, SshdStartError, SshHost, interpreter_paths,
                          make_client_key, start_cluster)

pytestmark = pytest.mark.e2e  # real sshd workers


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    return make_client_key(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def cluster(client_key: ClientKey) -> Iterator[SshCluster]:
    with start_cluster(2) as c:
        c.authorize(client_key.public_line)
        yield c


def connect(host: SshHost, key: ClientKey) -> paramiko.SSHClient:
    """Connect the way the launcher should: the host key pinned in advance, unknown keys rejected."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(host.ip, host.host_key_type, paramiko.Ed25519Key(data=host.host_key_bytes))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host.ip, port=host.port, username="root", key_filename=str(key.private_key_path),
                   look_for_keys=False, allow_agent=False, timeout=5)
    return client


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _, out, err = client.exec_command(command, timeout=30)
    rc = out.channel.recv_exit_status()
    return rc, out.read().decode(), err.read().decode()


def process_names(pids: list[int]) -> set[str]:
    names = set()
    for p in pids:
        try:
            names.add(Path(f"/proc/{p}/comm").read_text().strip())
        except OSError:  # exited meanwhile
            pass
    return names


def test_hosts_have_distinct_ips_keys_and_hostnames(cluster: SshCluster, client_key: ClientKey) -> None:
    a, b = cluster
    assert a.ip != b.ip and a.host_key_b64 != b.host_key_b64
    assert a.host_key_type == "ssh-ed25519"
    assert a.known_hosts_line == f"{a.ip} ssh-ed25519 {a.host_key_b64}"
    for host in cluster:
        with connect(host, client_key) as c:
            assert c.get_transport().get_remote_server_key().get_base64() == host.host_key_b64
            assert run(c, "hostname") == (0, host.hostname + "\n", "")


def test_pinned_wrong_host_key_is_rejected(cluster: SshCluster, client_key: ClientKey) -> None:
    a, b = cluster
    client = paramiko.SSHClient()
    client.get_host_keys().add(a.ip, "ssh-ed25519", paramiko.Ed25519Key(data=b.host_key_bytes))
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(a.ip, username="root", key_filename=str(client_key.private_key_path),
                       look_for_keys=False, allow_agent=False, timeout=5)
    client.close()


def test_unauthorized_client_key_is_rejected(cluster: SshCluster, tmp_path: Path) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        connect(cluster[0], make_client_key(tmp_path, comment="stranger"))


def test_exec_and_remote_python_has_jax(cluster: SshCluster, client_key: ClientKey) -> None:
    host = cluster[0]
    with connect(host, client_key) as c:
        assert run(c, "echo hi") == (0, "hi\n", "")
        assert run(c, f"{host.python} -c 'import sys; print(sys.version)'") == (0, sys.version + "\n", "")
        # `python3` on PATH is the same interpreter (sshd SetEnv PATH, or the login shell's own PATH).
        assert run(c, "python3 -c 'import sys; print(sys.version)'") == (0, sys.version + "\n", "")
        rc, out, err = run(c, f"{host.python} -c 'import jax; print(jax.__version__)'")
        assert (rc, out.strip()) == (0, importlib.metadata.version("jax")), err


def test_root_and_tmp_are_private_to_each_host(cluster: SshCluster, client_key: ClientKey) -> None:
    a, b = cluster
    name = f"harness-{uuid.uuid4().hex}"
    files = [f"/root/{name}", f"/tmp/{name}"]
    with connect(a, client_key) as ca, connect(b, client_key) as cb:
        for f in files:
            assert run(ca, f"echo from-a > {f} && cat {f}") == (0, "from-a\n", "")
            assert run(cb, f"test -e {f}")[0] == 1, f"{f} written on {a.ip} is visible on {b.ip}"
            assert not os.path.exists(f), f"{f} written on {a.ip} is visible on the test machine"
        # The shared parts of the filesystem stay usable on every host.
        assert run(cb, f"test -x {b.python} && test -d /usr/bin")[0] == 0


@pytest.fixture(scope="module")
def tmp_venv() -> Iterator[Path]:
    """A venv under the test machine's /tmp, in a directory whose name a shell would mangle, with a
    symlink to it and a file beside it: '/tmp/harness it's $(touch pwned) XXXX/{venv dir, venv link, secret}'."""
    parent = Path(tempfile.mkdtemp(prefix="harness it's $(touch pwned) ", dir="/tmp")).resolve()
    try:
        venv = parent / "venv dir"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                       timeout=120)
        (parent / "venv link").symlink_to("venv dir")
        (parent / "secret").write_text("test machine only\n")
        yield venv
    finally:
        shutil.rmtree(parent)


@pytest.fixture(scope="module")
def shown_host(tmp_venv: Path, client_key: ClientKey) -> Iterator[SshHost]:
    """A host shown the venv through its symlink (plus the test interpreter, which the venv's
    python links to)."""
    with SshHost(visible_paths=[*interpreter_paths(), tmp_venv.with_name("venv link")]) as host:
        host.authorize(client_key.public_line)
        yield host


def prefix_of(python: Path) -> str:
    return f"{shlex.quote(str(python))} -c 'import sys; print(sys.prefix)'"


def test_interpreter_under_tmp_runs_on_a_host_shown_it(shown_host: SshHost, tmp_venv: Path,
                                                       client_key: ClientKey) -> None:
    link = tmp_venv.with_name("venv link")
    # Mounted at its real path and at the path given, both from the real directory.
    assert {(str(tmp_venv), str(tmp_venv)), (str(tmp_venv), str(link))} <= set(shown_host.visible_mounts)
    with connect(shown_host, client_key) as c:
        for venv in (tmp_venv, link):
            here = subprocess.run(prefix_of(venv / "bin" / "python"), shell=True, capture_output=True, text=True)
            assert (here.returncode, here.stdout) == (0, f"{venv}\n"), here.stderr
            assert run(c, prefix_of(venv / "bin" / "python")) == (0, here.stdout, "")
        # Read-only: a host cannot change the test machine's interpreter...
        rc, _, err = run(c, f"touch {shlex.quote(str(tmp_venv / 'from-host'))}")
        assert rc != 0 and "Read-only file system" in err
        assert not (tmp_venv / "from-host").exists()
        # ...but making its own venv from it works as on a VM.
        rc, out, err = run(c, f"{shlex.quote(str(tmp_venv / 'bin' / 'python'))} -m venv --without-pip /tmp/own && "
                              "/tmp/own/bin/python -c 'import sys; print(sys.prefix)'")
        assert (rc, out) == (0, "/tmp/own\n"), err
    assert not os.path.exists("/tmp/own")


def test_tmp_stays_private_beside_visible_paths(shown_host: SshHost, cluster: SshCluster, tmp_venv: Path,
                                                client_key: ClientKey) -> None:
    other = cluster[0]
    fd, loose = tempfile.mkstemp(prefix="harness-test-machine-", dir="/tmp")
    os.close(fd)
    name = f"harness-{uuid.uuid4().hex}"
    beside = tmp_venv.parent / name
    try:
        with connect(shown_host, client_key) as c, connect(other, client_key) as co:
            # The test machine's files next to the visible venv, or elsewhere in /tmp, stay hidden.
            for hidden in (tmp_venv.parent / "secret", loose):
                assert run(c, f"test -e {shlex.quote(str(hidden))}")[0] == 1, f"{hidden} is visible on the host"
            # What the host writes to /tmp, even beside the visible venv, stays in the host.
            for f in (f"/tmp/{name}", str(beside)):
                assert run(c, f"echo from-host > {shlex.quote(f)} && cat {shlex.quote(f)}") == (0, "from-host\n", "")
                assert not os.path.exists(f), f"{f} written on {shown_host.ip} is visible on the test machine"
                assert run(co, f"test -e {shlex.quote(f)}")[0] == 1, f"{f} written on {shown_host.ip} is on {other.ip}"
            # Hosts without the visible path do not see it.
            assert run(co, f"test -e {shlex.quote(str(tmp_venv))}")[0] == 1
    finally:
        os.unlink(loose)


def test_default_visible_paths_are_the_interpreters() -> None:
    paths = interpreter_paths()
    real_dir = os.path.dirname(os.path.realpath(sys.executable))
    for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(sys.executable)), real_dir):
        assert p in paths or p in PRIVATE_DIRS, (p, paths)


@pytest.mark.parametrize("bad, error", [(["/tmp"], ValueError), (["/tmp/no such dir/x"], ValueError),
                                        ("/srv", TypeError)])
def test_visible_paths_are_checked(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        SshHost(visible_paths=bad)  # type: ignore[arg-type]


def test_stop_kills_every_process_and_cleans_up(client_key: ClientKey) -> None:
    host = SshHost().start()
    try:
        host.authorize(client_key.public_line)
        with connect(host, client_key) as c:
            # A detached job, like the launcher's training run, must die with the host too.
            assert run(c, "nohup sleep 600 >/dev/null 2>&1 &")[0] == 0
        deadline = time.monotonic() + 5
        while not {"sshd", "sleep"} <= (comms := process_names(pids := host.pids())):  # nohup execs sleep
            assert time.monotonic() < deadline, comms
            time.sleep(0.02)
    finally:
        host.stop()
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "processes survived stop()"
    assert not host.state_dir.exists() and not host.running
    with pytest.raises(OSError):
        socket.create_connection((host.ip, host.port), timeout=1).close()
    with SshHost(host.ip):  # the IP lease was released
        pass


def test_sshd_that_fails_to_start_raises_with_its_log() -> None:
    host = SshHost(extra_config=["NoSuchOption yes"])
    with pytest.raises(SshdStartError, match="NoSuchOption"):
        host.start()
    assert not host.state_dir.exists()
