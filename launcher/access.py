"""Access to a TPU VM's workers, in one place: who logs in, how the key gets there, how the
connection is made, and which host keys are trusted. Every other module asks `open_workers`
for connections.

- **The key.** A VM `mllm vm create` made carries `root:<our key>` in its `ssh-keys` metadata.
  Any other VM (made with gcloud or the console, a teammate's, ours after the key file was
  lost) gets the key added with UpdateNode, every other user's line kept, as gcloud does. The
  guest agent writes authorized_keys seconds after the metadata changes, so a refused login is
  tried again with backoff for up to AUTH_WAIT_SEC (gcloud's reason for its own retries).
- **OS Login.** Where it is in force (the node's `enable-oslogin`, else the project's), the guest
  agent ignores metadata keys: logging in then needs the OS Login user, which is refused in one
  line naming the cause and the way out.
- **The connection.** Direct, to external or internal IPs, or through an OpenSSH-style
  ProxyCommand (`--ssh-proxy "ssh -W %h:%p bastion"`, remembered like the zone).
- **Host keys.** Those the guest agent publishes (guest attributes); where those are refused,
  each worker's key is pinned on first use, per node id and worker (not per IP: a VM created
  again at the same address is a new machine), and `forget_pins` drops a node's pins.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from google.cloud import tpu_v2

from launcher import cloud, keys, ssh, state
from launcher.errors import LauncherError

ROOT = "root"
AUTH_WAIT_SEC = 90.0
"""How long a refused login is tried again after the key went into the metadata."""


@dataclass
class Login:
    """Who the launcher is on a VM's workers and how it gets there."""

    user: str
    proxy: str | None = None
    key_added: bool = False
    """The key went into the node's metadata just now: the guest agent may not have written it yet."""


def ssh_keys_with(metadata: str, user: str, public_key: str) -> str | None:
    """The `ssh-keys` metadata value with `user:<key>` in it, every other line kept; None when
    it is there already (compared without the key's comment)."""
    wanted = public_key.split()[:2]
    lines = [line for line in metadata.splitlines() if line.strip()]
    for line in lines:
        name, _, key = line.partition(":")
        if name == user and key.split()[:2] == wanted:
            return None
    return "\n".join([*lines, f"{user}:{public_key}"])


def os_login_in_force(node: tpu_v2.Node, project: str) -> bool:
    """The node's `enable-oslogin` metadata, else the project's (Compute Engine's rule)."""
    value = node.metadata.get(cloud.OS_LOGIN_KEY)
    if value is not None:
        return value.strip().upper() == "TRUE"
    from launcher import compute

    try:
        return compute.os_login_in_force(project)
    except LauncherError as e:  # reading project metadata needs compute.projects.get, which not every role has
        print(f"warning: cannot tell whether OS Login is on for {project} ({e}); logging in with a metadata key",
              file=sys.stderr)
        return False


def ensure_key(z: cloud.Zone, node: tpu_v2.Node, user: str, public_key: str) -> bool:
    """Make sure `user:<public_key>` is in the node's `ssh-keys` metadata (UpdateNode, other
    users' lines and other metadata kept); True when it was added now."""
    merged = ssh_keys_with(node.metadata.get(cloud.SSH_KEYS, ""), user, public_key)
    if merged is None:
        return False
    name = node.name.rsplit("/", 1)[-1]
    print(f"adding the launcher's SSH key for {user} to the metadata of {name}", file=sys.stderr)
    z.set_metadata(node, {**dict(node.metadata), cloud.SSH_KEYS: merged})
    return True


def login(z: cloud.Zone, node: tpu_v2.Node, user: str | None, ssh_proxy: str | None) -> Login:
    """How to log in to this node: the user (root unless given), its key in the node's metadata,
    and the proxy (given, else remembered)."""
    name = node.name.rsplit("/", 1)[-1]
    proxy = resolve_proxy(ssh_proxy)
    if os_login_in_force(node, z.project):
        raise LauncherError(
            f"TPU VM {name} has OS Login in force (enable-oslogin=TRUE in its {'metadata' if cloud.OS_LOGIN_KEY in node.metadata else 'project'}'s "
            "metadata): the guest agent ignores metadata SSH keys there, and logging in as an OS Login user is "
            "not supported yet; create the VM with `mllm vm create` (it sets enable-oslogin=FALSE on the VM)")
    user = user or ROOT
    _, public_key = keys.ensure_key()
    return Login(user, proxy, ensure_key(z, node, user, public_key))


def resolve_proxy(given: str | None) -> str | None:
    """--ssh-proxy, else $MLLM_SSH_PROXY, else the remembered one ("" or "none" = connect directly)."""
    proxy = state.resolve("ssh_proxy", given, "--ssh-proxy", required=False)
    if proxy is None or proxy.strip().lower() in ("", "none"):
        return None
    if "%h" not in proxy:
        raise LauncherError(f"--ssh-proxy {proxy!r}: expected a command with %h (and %p) for the worker, "
                            "e.g. 'ssh -W %h:%p bastion'")
    return proxy


def pins_path(node: tpu_v2.Node) -> Path:
    """Host keys pinned on first use for one node (by node id)."""
    return keys.config_dir() / "pins" / str(node.id or node.name.rsplit("/", 1)[-1])


def forget_pins(node: tpu_v2.Node) -> None:
    """A node created again is a new machine: its old pins mean nothing."""
    pins_path(node).unlink(missing_ok=True)


def workers(z: cloud.Zone, node: tpu_v2.Node, internal_ip: bool) -> list[ssh.Worker]:
    """The node's workers in worker order: addresses, published host keys (or a pin file)."""
    name = node.name.rsplit("/", 1)[-1]
    published = z.host_keys(name)
    pins = pins_path(node)
    return [ssh.Worker(i, ip, host_keys=published.get(i, {}), pins=None if published else pins)
            for i, ip in enumerate(cloud.worker_ips(node, internal=internal_ip))]


def connections(node: tpu_v2.Node, how: Login) -> ssh.Connections:
    """SSH connections as `how` says: a refused login is tried again for AUTH_WAIT_SEC, then one
    line with the likely cause."""
    key_file, _ = keys.ensure_key()
    name = node.name.rsplit("/", 1)[-1]
    hint = (f"the key added to {name}'s ssh-keys metadata for {how.user} never reached the worker "
            "(is OS Login in force there, or does the guest agent not run?)" if how.key_added else
            f"{name}'s ssh-keys metadata has the launcher's key for {how.user}, but the worker refuses it "
            "(OS Login in force? a different --user?)")
    return ssh.Connections(how.user, key_file, keys.config_dir() / "known_hosts", auth_wait=AUTH_WAIT_SEC,
                           proxy=how.proxy, refused_hint=hint)
