"""Access to a TPU VM's workers, in one place: who logs in, how the key gets there, how the
connection is made, and which host keys are trusted. Every other module asks `open_workers`
for connections.

- **The key.** A VM `mllm vm create` made carries `root:<our key>` in its `ssh-keys` metadata.
  Any other VM (made with gcloud or the console, a teammate's, ours after the key file was
  lost) gets the key added with UpdateNode, every other user's line kept, as gcloud does. The
  guest agent writes authorized_keys seconds after the metadata changes, so a refused login is
  tried again with backoff for up to AUTH_WAIT_SEC (gcloud's reason for its own retries).
- **OS Login.** Where it is in force (the node's `enable-oslogin`, else the project's), the guest
  agent ignores metadata keys: the key is imported into the caller's OS Login profile (the OS
  Login API, as gcloud does) and the login is as that account's POSIX user; every worker path
  (repo, venv, `.env`, runs) is under that user's home. Nothing the launcher runs needs root.
- **The connection.** Direct, to external or internal IPs, or through an OpenSSH-style
  ProxyCommand (`--ssh-proxy "ssh -W %h:%p bastion"`, remembered like the zone).
- **Host keys.** Those the guest agent publishes (guest attributes); where those are refused,
  each worker's key is pinned on first use, per node id and worker (not per IP: a VM created
  again at the same address is a new machine), and `forget_pins` drops a node's pins.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from google.cloud import tpu_v2

from launcher import cloud, keys, ssh, state
from launcher.errors import LauncherError

ROOT = "root"
ENV_OSLOGIN_ENDPOINT = "MLLM_OSLOGIN_API_ENDPOINT"
"""Points the OS Login client at another server (REST, anonymous credentials), like
MLLM_TPU_API_ENDPOINT: the tests' FakeTpuApi serves it."""
ENV_ACCOUNT = "CLOUDSDK_CORE_ACCOUNT"
"""gcloud's own setting for the account whose OS Login profile takes the key."""
AUTH_WAIT_SEC = 90.0
"""How long a refused login is tried again after the key went into the metadata."""


@dataclass
class Login:
    """Who the launcher is on a VM's workers and how it gets there."""

    user: str
    proxy: str | None = None
    key_added: bool = False
    """The key went into the node's metadata just now: the guest agent may not have written it yet."""
    os_login: str | None = None
    """The account (email) whose OS Login profile holds the key, where OS Login is in force."""


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
    """The node's `enable-oslogin` metadata, else the project's (compute.os_login_in_force)."""
    from launcher import compute

    try:
        return compute.os_login_in_force(project, dict(node.metadata))
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
    proxy = resolve_proxy(ssh_proxy)
    _, public_key = keys.ensure_key()
    if os_login_in_force(node, z.project):
        email = account()
        posix = import_key(email, z.project, public_key)
        if user and user != posix:
            raise LauncherError(f"--user {user}: OS Login is in force on {node.name.rsplit('/', 1)[-1]}, where "
                                f"{email} logs in as {posix}; drop --user")
        return Login(posix, proxy, os_login=email)
    user = user or ROOT
    return Login(user, proxy, ensure_key(z, node, user, public_key))


def account() -> str:
    """The email of the account whose OS Login profile takes the key: $CLOUDSDK_CORE_ACCOUNT,
    else the service account of the credentials, else the user's (Google's tokeninfo)."""
    given = os.environ.get(ENV_ACCOUNT, "").strip()
    if given:
        return given
    if os.environ.get(ENV_OSLOGIN_ENDPOINT):
        raise LauncherError(f"OS Login: set {ENV_ACCOUNT} to the account whose key to import "
                            f"({ENV_OSLOGIN_ENDPOINT} uses anonymous credentials)")
    import google.auth
    import google.auth.transport.requests
    import requests

    try:
        credentials, _ = google.auth.default(scopes=list(cloud.DEFAULT_SCOPES))
        email = getattr(credentials, "service_account_email", None)
        if email and "@" in email:
            return email
        credentials.refresh(google.auth.transport.requests.Request())
        info = requests.get("https://oauth2.googleapis.com/tokeninfo", params={"access_token": credentials.token},
                            timeout=20).json()
    except Exception as e:  # noqa: BLE001 - any failure here has the same way out
        raise LauncherError(f"OS Login: cannot tell which account you are ({type(e).__name__}); "
                            f"set {ENV_ACCOUNT}=you@example.com") from None
    if "@" not in str(info.get("email", "")):
        raise LauncherError(f"OS Login: your credentials do not say your email; set {ENV_ACCOUNT}=you@example.com")
    return str(info["email"])


def import_key(email: str, project: str, public_key: str) -> str:
    """Import the launcher's key into the account's OS Login profile (the OS Login API, REST);
    the POSIX username to log in as (the account's primary one, for this project if it has one)."""
    from google.api_core import exceptions as gexc
    from google.cloud import oslogin_v1
    from google.cloud.oslogin_v1 import common

    endpoint = os.environ.get(ENV_OSLOGIN_ENDPOINT)
    with cloud.api_errors(f"importing the SSH key into the OS Login profile of {email}"):
        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            client = oslogin_v1.OsLoginServiceClient(transport="rest", credentials=AnonymousCredentials(),
                                                     client_options={"api_endpoint": endpoint})
        else:
            client = oslogin_v1.OsLoginServiceClient(transport="rest")
        try:
            resp = client.import_ssh_public_key(parent=f"users/{email}", ssh_public_key=common.SshPublicKey(key=public_key),
                                                project_id=project, retry=cloud.READ_RETRY)
        except gexc.NotFound as e:
            raise LauncherError(f"OS Login: no account {email} ({e.message}); check {ENV_ACCOUNT}") from None
    accounts = list(resp.login_profile.posix_accounts)
    ranked = sorted(accounts, key=lambda a: (a.account_id != project, not a.primary))
    if not ranked or not ranked[0].username:
        raise LauncherError(f"OS Login: the profile of {email} has no POSIX account; ask an admin for "
                            "roles/compute.osLogin on the project")
    return ranked[0].username


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
    if how.os_login:
        hint = (f"OS Login refuses {how.os_login} on {name}: it needs roles/compute.osLogin (or osAdminLogin) "
                "on the project, and the TPU VM's service account roles/iam.serviceAccountUser")
    elif how.key_added:
        hint = (f"the key added to {name}'s ssh-keys metadata for {how.user} never reached the worker "
                "(is OS Login in force there, or does the guest agent not run?)")
    else:
        hint = (f"{name}'s ssh-keys metadata has the launcher's key for {how.user}, but the worker refuses it "
                "(OS Login in force? a different --user?)")
    return ssh.Connections(how.user, key_file, keys.config_dir() / "known_hosts", auth_wait=AUTH_WAIT_SEC,
                           proxy=how.proxy, refused_hint=hint)
