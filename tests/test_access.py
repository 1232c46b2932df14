"""End-to-end: reaching workers of VMs as real projects make them, through the real `mllm` CLI,
the Cloud TPU API harness and sshd workers: a VM `mllm` did not create (the key added to its
metadata, arriving seconds later), guest attributes refused (keys pinned on first use, per node),
project-wide OS Login, the API's bad minutes, and workers reached only through a ProxyCommand."""

from __future__ import annotations

import socket
import time

import pytest
from google.cloud import tpu_v2

from conftest import ACCOUNT, launcher_env, mllm
from harness.tpu_slice import ZONE, Slice

pytestmark = pytest.mark.e2e  # real sshd workers

ALICE = "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake alice@laptop"


def create_by_hand(api, name: str, metadata: dict[str, str]) -> None:
    """A VM made with gcloud or the console: no key of ours, no label."""
    node = tpu_v2.Node(accelerator_type="v6e-8", runtime_version="v6e-ubuntu-2404", metadata=metadata,
                       network_config=tpu_v2.NetworkConfig(enable_external_ips=True))
    api.client().create_node(parent=f"projects/test-project/locations/{ZONE}", node=node, node_id=name).result(30)


def test_a_vm_made_elsewhere_gets_our_key_and_keeps_theirs(tmp_path, hosts):
    """gcloud's way: UpdateNode appends our key to `ssh-keys` (alice's line stays), then the
    login is tried again until the guest agent has written it (8 s here)."""
    tpu = Slice(hosts, key_delay=8.0)
    with tpu.api as api:
        env = launcher_env(tmp_path, api.endpoint)
        create_by_hand(api, "theirs", {"ssh-keys": ALICE})
        start = time.monotonic()
        out = mllm("exec", "--vm", "theirs", "--zone", ZONE, "--", "echo", "hello from $HOSTNAME", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        assert "[w0] hello from $HOSTNAME" in out.stdout and time.monotonic() - start >= 8
        assert out.stderr.count("adding the launcher's SSH key for root to the metadata of theirs") == 1, out.stderr
        lines = api.node("theirs")["metadata"]["ssh-keys"].splitlines()
        ours = (tmp_path / "config" / "mllm" / "id_ed25519.pub").read_text().strip()
        assert lines == [ALICE, f"root:{ours}"]
        again = mllm("exec", "--", "true", cwd=tmp_path, env=env)  # the key is there now: no update
        assert again.returncode == 0 and "adding" not in again.stderr
        assert sum(r.method == "PATCH" for r in api.requests) == 1


def test_guest_attributes_refused_pins_keys_per_node_and_503s_are_ridden_out(tmp_path, hosts):
    """Org policy compute.disableGuestAttributesAccess: one warning, then trust on first use,
    pinned by node id and worker; three 503s in a row do not fail `exec`."""
    tpu = Slice(hosts)
    with tpu.api as api:
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "locked", "--zone", ZONE, cwd=tmp_path, env=env).returncode == 0
        api.fail_next(403, "Guest attributes are disabled by the organization policy", path=":getGuestAttributes",
                      times=10)
        out = mllm("exec", "--", "true", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        (warning,) = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
        assert "publishes no host keys" in warning and "first use" in warning
        (pins,) = (tmp_path / "config" / "mllm" / "pins").iterdir()
        assert pins.name == api.node("locked")["id"] and pins.read_text().split()[:2] == ["w0", hosts[0].host_key_type]
        assert pins.read_text().split()[2] == hosts[0].host_key_b64

        api.fail_next(503, "The service is currently unavailable.", method="GET", times=3)
        again = mllm("exec", "--", "true", cwd=tmp_path, env=env)  # 503s, a 403, then the pinned key
        assert again.returncode == 0, again.stderr
        assert api.pending_failures == 8 and again.stderr.count("warning:") == 1

        # A different machine answering at that address for the same node: refused.
        pins.write_text(f"w0 {hosts[0].host_key_type} {hosts[1].host_key_b64}\n")
        refused = mllm("exec", "--", "true", cwd=tmp_path, env=env)
        assert refused.returncode == 2 and "does not match the key pinned on first use" in refused.stderr


def test_os_login_vms_are_reached_as_the_posix_user(tmp_path, hosts):
    """Where the project turns OS Login on, the VM `mllm vm create` made opts out and is reached
    as root; an `--os-login` VM, and one made by hand that inherits the project's setting, are
    reached as the account's POSIX user once the key is in its OS Login profile (the OS Login
    API, no metadata key); the worker paths are that user's home."""
    tpu = Slice(hosts)
    with tpu.api as api:
        api.set_project_metadata("test-project", "enable-oslogin", "TRUE")
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "ours", "--zone", ZONE, cwd=tmp_path, env=env).returncode == 0
        out = mllm("exec", "--", "id", "-un", cwd=tmp_path, env=env)
        assert out.returncode == 0 and "[w0] root" in out.stdout, out.stderr
        assert api.login_profile(ACCOUNT) is None  # root by metadata key: OS Login was not asked

        posix = "tester_example_com"
        assert mllm("vm", "create", "osl", "--zone", ZONE, "--os-login", cwd=tmp_path, env=env).returncode == 0
        assert "ssh-keys" not in api.node("osl")["metadata"]
        who = mllm("exec", "--", "sh", "-c", 'echo "$(id -un) $HOME"', cwd=tmp_path, env=env)
        assert who.returncode == 0, who.stderr
        assert f"[w0] {posix} /home/{posix}" in who.stdout
        ours = (tmp_path / "config" / "mllm" / "id_ed25519.pub").read_text().strip()
        (profile_key,) = api.login_profile(ACCOUNT)["sshPublicKeys"].values()
        assert profile_key["key"] == ours
        (tmp_path / "w.env").write_text("WANDB_API_KEY=secret\n")
        pushed = mllm("env", "push", "--src", str(tmp_path / "w.env"), cwd=tmp_path, env=env)
        assert pushed.returncode == 0 and f"[w0] /home/{posix}/.env (0600): WANDB_API_KEY" in pushed.stdout, pushed.stderr
        refused = mllm("exec", "--user", "root", "--", "true", cwd=tmp_path, env=env)
        assert refused.returncode == 2 and f"logs in as {posix}; drop --user" in refused.stderr

        create_by_hand(api, "managed", {})  # inherits the project's OS Login
        managed = mllm("exec", "--vm", "managed", "--", "sh", "-c", "id -un; ls -a ~", cwd=tmp_path, env=env)
        assert managed.returncode == 0 and f"[w0] {posix}" in managed.stdout and ".env" in managed.stdout, managed.stderr
        assert not any(r.method == "PATCH" for r in api.requests)  # no metadata key anywhere


def test_workers_with_no_route_are_reached_through_the_ssh_proxy(tmp_path, hosts):
    """`--no-external-ip` workers whose internal address only a bastion resolves: reached through
    `--ssh-proxy` (OpenSSH's `ssh -W %h:%p bastion`), which is remembered like the zone."""
    worker, bastion = hosts[0], hosts[1]
    internal = "tpu-w0.corp.internal"
    with open(bastion.state_dir / "hosts", "a") as f:  # the bastion's private /etc/hosts
        f.write(f"{worker.ip} {internal}\n")
    tpu = Slice(hosts, internal_names={worker.ip: internal})
    with tpu.api as api:
        env = launcher_env(tmp_path, api.endpoint)
        created = mllm("vm", "create", "private", "--zone", ZONE, "--no-external-ip", cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        assert "accessConfig" not in api.node("private")["networkEndpoints"][0]
        with pytest.raises(OSError):
            socket.getaddrinfo(internal, 22)  # no route from the laptop
        key = tmp_path / "config" / "mllm" / "id_ed25519"
        bastion.authorize(key.with_suffix(".pub").read_text().strip())
        proxy = (f"ssh -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
                 f"-W %h:%p root@{bastion.ip}")
        out = mllm("exec", "--internal-ip", "--ssh-proxy", proxy, "--", "hostname", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        assert f"[w0] {worker.hostname}" in out.stdout
        again = mllm("exec", "--internal-ip", "--", "hostname", cwd=tmp_path, env=env)  # the proxy is remembered
        assert again.returncode == 0 and f"[w0] {worker.hostname}" in again.stdout, again.stderr
