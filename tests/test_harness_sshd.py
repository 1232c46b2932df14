"""The sshd harness gives each fake TPU VM worker real SSH, its own host key and its own files.

These checks guard the assumptions the launcher's end-to-end tests build on: host-key pinning works
with the key the harness reports, remote commands find a Python with jax, files written on one
worker do not leak to another or to the test machine, and stop() leaves no process behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from harness.sshd import ClientKey, SshCluster, SshdStartError, SshHost, make_client_key, start_cluster


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
