"""End-to-end: `mllm` creates a 2-worker TPU VM on the local Cloud TPU API whose workers are real
sshd hosts (each with its own /root and /tmp), then bootstraps, reports versions, runs commands
and pushes secrets over SSH, verifying host keys against the VM's guest attributes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import MLLM, REPO, launcher_env, mllm
from harness.tpu_api import FakeTpuApi
from harness.tpu_slice import ZONE, Slice

pytestmark = pytest.mark.e2e  # real sshd workers


def test_two_worker_lifecycle(tmp_path, hosts):
    secret = "s3cr3t-wandb-value-42"
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=tmp_path, env=env)  # noqa: E731
        outputs = []

        created = run("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16")
        assert created.returncode == 0, created.stderr
        listed = json.loads(run("vm", "list", "--json").stdout)
        assert [(r["name"], r["workers"], r["ips"]) for r in listed] == [("pair", 2, hosts.ips)]

        boot = run("bootstrap", "--python", sys.executable)
        assert boot.returncode == 0, boot.stderr
        assert f"[w0] ready: {sys.executable} (existing" in boot.stdout and f"[w1] ready: {sys.executable}" in boot.stdout

        versions = run("versions", "--json")
        assert versions.returncode == 0, versions.stderr
        found = json.loads(versions.stdout)
        assert set(found["workers"]) == {"0", "1"} and found["mismatches"] == []
        import jax

        assert found["laptop"]["jax"] == jax.__version__ and found["laptop"]["python"] == found["workers"]["0"]["python"]
        for v in found["workers"].values():
            assert v["python"] == ".".join(map(str, sys.version_info[:3])) and v["jax"] == jax.__version__
            assert v["backend"] == "cpu" and v["device_count"] >= 1 and v["kernel"] and "libtpu" in v
        table = run("versions")
        assert "jaxlib" in table.stdout and "cpu" in table.stdout and "laptop" in table.stdout and " *" not in table.stdout

        # Arguments arrive as arguments: nothing in them is expanded by the remote shell.
        echo = run("exec", "--worker", "all", "--", "echo", "$(id -u)", "a  b", "'q'")
        assert echo.returncode == 0, echo.stderr
        assert sorted(echo.stdout.splitlines()) == ["[w0] $(id -u) a  b 'q'", "[w1] $(id -u) a  b 'q'"]

        # Each worker has its own filesystem; the exit code is the worst worker's.
        assert run("exec", "--worker", "0", "--", "touch", "/root/only-w0").returncode == 0
        check = run("exec", "--", "test", "-e", "/root/only-w0")
        assert check.returncode == 1
        codes = run("exec", "--", "sh", "-c", "hostname; exit $(( $(hostname | tail -c 2) % 3 ))")
        assert codes.returncode == max(int(ip.rsplit(".", 1)[1]) % 3 for ip in hosts.ips)

        fast = run("exec", "--fail-fast", "--", "sh", "-c", f"[ $(hostname) = {hosts[0].hostname} ] && exit 3; sleep 60")
        assert fast.returncode == 3

        (tmp_path / ".env").write_bytes(f"export WANDB_API_KEY='{secret}'  \r\nWANDB_ENTITY=team\r\n".encode())
        pushed = run("env", "push", "--worker", "all")
        assert pushed.returncode == 0, pushed.stderr
        assert "[w0] /root/.env (0600): WANDB_API_KEY, WANDB_ENTITY" in pushed.stdout
        probe = ("import os, stat; d = open('/root/.env', 'rb').read(); "
                 "print(oct(stat.S_IMODE(os.stat('/root/.env').st_mode)), b'\\r' in d, d.endswith(b'  '))")
        mode = run("exec", "--", sys.executable, "-c", probe)
        assert sorted(mode.stdout.splitlines()) == ["[w0] 0o600 False False", "[w1] 0o600 False False"]
        # --env-file is read by the trainer's dotenv reader, from the synced repo.
        clone = tmp_path / "checkout"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        assert mllm("sync", "--vm", "pair", "--zone", ZONE, cwd=clone, env=env).returncode == 0
        length = run("exec", "--env-file", "/root/.env", "--", "sh", "-c", 'echo "${#WANDB_API_KEY} $WANDB_ENTITY"')
        assert run("exec", "--", "rm", "-rf", "/root/mllm-jax").returncode == 0  # the next tests need a bare worker
        assert sorted(length.stdout.splitlines()) == [f"[w0] {len(secret)} team", f"[w1] {len(secret)} team"]
        outputs += [created, boot, versions, echo, pushed, mode, length]

        deleted = run("vm", "delete", "--yes")
        assert deleted.returncode == 0 and not api.nodes
        for out in outputs + [deleted]:
            assert secret not in out.stdout + out.stderr


def test_host_key_differing_from_guest_attributes_is_refused(tmp_path, hosts):
    s = Slice(hosts)
    s.hosts_for_node = lambda node_id, t: [{"ip": hosts[0].ip, "host_keys": {"ssh-ed25519": hosts[1].host_public_key_line}}]
    s.api = FakeTpuApi(s.hosts_for_node, on_create=s.authorize, op_delay=0.1)
    with s.api as api:
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "liar", "--zone", ZONE, "--type", "v6e-8", cwd=tmp_path, env=env).returncode == 0
        out = mllm("exec", "--", "touch", "/root/should-not-exist", cwd=tmp_path, env=env)
        assert out.returncode == 2
        assert out.stderr.strip() == (f"error: worker 0 ({hosts[0].ip}): host key ssh-ed25519 does not match "
                                      "the key the VM published; refusing to connect")


def test_unpublished_host_key_is_trusted_on_first_use_then_pinned(tmp_path, hosts):
    with Slice(hosts, publish_keys=False).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "tofu", "--zone", ZONE, "--type", "v6e-8", cwd=tmp_path, env=env).returncode == 0
        assert mllm("exec", "--", "true", cwd=tmp_path, env=env).returncode == 0
        known = tmp_path / "config" / "mllm" / "pins" / api.node("tofu")["id"]  # per node id and worker
        assert known.read_text().split() == ["w0", "ssh-ed25519", hosts[0].host_key_b64]
        known.write_text(f"w0 ssh-ed25519 {hosts[1].host_key_b64}\n")  # as if the key changed
        out = mllm("exec", "--", "true", cwd=tmp_path, env=env)
        assert out.returncode == 2 and "does not match the key pinned on first use" in out.stderr


def test_interactive_ssh_shell(tmp_path, hosts):
    """`mllm ssh` hands a real terminal to the system ssh, with our key and the published host key."""
    import os
    import pty
    import select
    import subprocess
    import time

    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint, TERM="dumb")
        assert mllm("vm", "create", "shell", "--zone", ZONE, "--type", "v6e-8", cwd=tmp_path, env=env).returncode == 0
        leader, follower = pty.openpty()
        from conftest import MLLM

        proc = subprocess.Popen([MLLM, "ssh"], cwd=tmp_path, env=env, stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        os.write(leader, b"echo marker-$((6*7)) $(hostname)\nexit\n")
        seen, deadline = b"", time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
        assert f"marker-42 {hosts[0].hostname}".encode() in seen


def test_bootstrap_needs_a_repo_and_a_working_python(tmp_path, hosts):
    """Bootstrap installs the synced repo, so it runs inside one; --python must run there."""
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=tmp_path, env=env)  # noqa: E731
        assert run("vm", "create", "venv", "--zone", ZONE, "--type", "v6e-8").returncode == 0
        outside = run("bootstrap")
        assert outside.returncode == 2
        assert outside.stderr.strip() == "error: not inside a git repository: mllm sync/launch ship the current repo's commit"
        unsynced = run("bootstrap", "--no-sync")
        assert unsynced.returncode == 2 and unsynced.stderr.strip() == (
            "error: worker 0: bootstrap failed: /root/mllm-jax/pyproject.toml not found: sync the repo first (`mllm sync`)")
        ok = run("bootstrap", "--python", sys.executable)
        assert ok.returncode == 0 and f"[w0] ready: {sys.executable} (existing interpreter)" in ok.stdout
        record = run("exec", "--", "cat", "/root/.mllm/python")
        assert record.stdout.strip() == f"[w0] {sys.executable}"
        bad = run("bootstrap", "--python", "/no/such/python")
        assert bad.returncode == 2 and bad.stderr.startswith("error: worker 0: --python /no/such/python does not run")


def sleeping(seconds: int) -> list[int]:
    """Processes (on any harness worker) running exactly `sleep SECONDS`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", str(seconds).encode()]:
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_ctrl_c_ends_the_command_on_every_worker(tmp_path, hosts):
    """Ctrl-C while a remote command runs (a bootstrap whose interpreter hangs, a user's `exec`):
    one line, exit 130 at once, and the command ends on every worker (no orphan keeps running)."""
    shared = Path(tempfile.mkdtemp(prefix="mllm-slow-", dir="/srv"))  # every worker sees /srv
    try:
        slow = shared / "python"
        slow.write_text("#!/bin/sh\nexec sleep 3127\n")
        slow.chmod(0o755)
        with Slice(hosts).api as api:
            env = launcher_env(tmp_path, api.endpoint)
            assert mllm("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16", cwd=tmp_path, env=env).returncode == 0
            for argv, seconds in ((["bootstrap", "--python", str(slow)], 3127), (["exec", "--", "sleep", "3128"], 3128)):
                proc = subprocess.Popen([MLLM, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                deadline = time.time() + 60
                while len(sleeping(seconds)) < 2 and time.time() < deadline:
                    time.sleep(0.2)
                assert len(sleeping(seconds)) == 2, argv  # running on both workers
                t0 = time.time()
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
                assert time.time() - t0 < 10, argv
                assert proc.returncode == 130 and err.splitlines() == [
                    "interrupted: stopped here and on the workers (a job already launched goes on: `mllm status`)"], err
                deadline = time.time() + 10
                while sleeping(seconds) and time.time() < deadline:
                    time.sleep(0.2)
                assert not sleeping(seconds), f"{argv}: still running on a worker"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
