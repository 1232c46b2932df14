"""`mllm doctor`: is everything a launch needs in place? One check per piece, in the order a
launch meets them, each through the same library call the launch makes, each a plain function
returning a `Check` (as SkyPilot's `sky check`).

Marks: ✓ fine, ! worth knowing but no obstacle (W&B key absent, OS Login on for the project),
✗ a launch would fail here (the line says what to do), - skipped because an earlier check failed.
Only ✗ fails `mllm doctor` (exit 1). With no credentials nothing is sent to any API.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from launcher import cloud, compute, keys, state
from launcher.readback import printable
from launcher.errors import LauncherError
from mllm_jax.contracts import BUCKET_PROBE_TIMEOUT_SEC

ADC_FIX = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
WANDB_KEY = "WANDB_API_KEY"
_KEY_MODE = 0o600  # ssh refuses a private key others may read
_API_TIMEOUT_SEC = 30.0  # per Cloud TPU API call (the client sets none for these)


class Mark(str, Enum):
    OK = "✓"
    WARN = "!"
    FAIL = "✗"
    SKIP = "-"


@dataclass(frozen=True)
class Check:
    """One check's result: `detail` says what was found, `fix` what to do about a ✗ or !."""

    name: str
    mark: Mark
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        """Whether a launch can go on past this check (warnings and skips do not fail it)."""
        return self.mark is not Mark.FAIL

    def line(self) -> str:
        text = f"{self.mark.value} {self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "")
        return printable(text)


def skipped(name: str, needs: str) -> Check:
    return Check(name, Mark.SKIP, f"skipped (needs {needs})")


# -- the checks, in order ------------------------------------------------------------------------


def check_credentials() -> Check:
    """Application Default Credentials, and whose they are (no network: nothing is refreshed)."""
    endpoint = os.environ.get(cloud.ENV_ENDPOINT)
    if endpoint:
        return Check("credentials", Mark.OK, f"anonymous ({cloud.ENV_ENDPOINT}={endpoint})")
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        return Check("credentials", Mark.FAIL, f"none found ({cloud._reason(e)})", ADC_FIX)
    source = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    where = f"GOOGLE_APPLICATION_CREDENTIALS={source}" if source else "application default"
    email = getattr(credentials, "service_account_email", None)
    if email:
        return Check("credentials", Mark.OK, f"service account {email} ({where})")
    account = getattr(credentials, "account", "")
    who = f"user {account}" if account else "user credentials"
    return Check("credentials", Mark.OK, f"{who} ({where})")


def check_project(given: str | None) -> tuple[Check, str | None]:
    """The project a launch would use (--project, $MLLM_PROJECT, remembered, gcloud's, ADC's)."""
    try:
        project = cloud.resolve_project(state.resolve("project", given, "--project", required=False))
    except LauncherError as e:  # its message says what to pass
        return Check("project", Mark.FAIL, str(e)), None
    return Check("project", Mark.OK, project), project


def check_api(z: cloud.Zone) -> Check:
    """The Cloud TPU API answers, for this project, about this zone."""
    endpoint = os.environ.get(cloud.ENV_ENDPOINT) or cloud.DEFAULT_HOST
    try:
        with cloud.api_errors(f"zone {z.zone}"):
            z.client.get_location(request={"name": z.parent}, timeout=_API_TIMEOUT_SEC)
    except LauncherError as e:
        return Check("Cloud TPU API", Mark.FAIL, str(e),
                     "is the API enabled in the project (`gcloud services enable tpu.googleapis.com`), "
                     "and does the zone offer TPUs?")
    return Check("Cloud TPU API", Mark.OK, f"{endpoint} answers for {z.parent}")


def check_accelerator_type(z: cloud.Zone, accelerator_type: str) -> Check:
    """The zone offers the type (else no create there can succeed)."""
    name = f"accelerator type {accelerator_type}"
    try:
        with cloud.api_errors(f"listing accelerator types in {z.zone}"):
            offered = sorted(t.type_ for t in z.client.list_accelerator_types(parent=z.parent, timeout=_API_TIMEOUT_SEC))
    except LauncherError as e:
        return Check(name, Mark.FAIL, str(e))
    if accelerator_type in offered:
        return Check(name, Mark.OK, f"offered in {z.zone}")
    return Check(name, Mark.FAIL, f"not offered in {z.zone} (offered: {', '.join(offered) or 'none'})",
                 "pick another --zone or --type")


def check_runtime_version(z: cloud.Zone, accelerator_type: str, version: str) -> Check:
    """The runtime image `mllm vm create --version VERSION` would ask for is offered in the zone."""
    chosen = cloud.runtime_version(accelerator_type, version)
    what = f"default runtime for {accelerator_type.split('-')[0]}: {chosen}" if version == "auto" else chosen
    try:
        with cloud.api_errors(f"listing runtime versions in {z.zone}"):
            offered = sorted(v.version for v in z.client.list_runtime_versions(parent=z.parent, timeout=_API_TIMEOUT_SEC))
    except LauncherError as e:
        return Check("runtime version", Mark.FAIL, str(e))
    if chosen in offered:
        return Check("runtime version", Mark.OK, f"{what}, offered in {z.zone}")
    return Check("runtime version", Mark.FAIL, f"{what}, not offered in {z.zone} (offered: {', '.join(offered) or 'none'})",
                 "pass --version with one of those")


def check_os_login(project: str) -> Check:
    """Informational: `mllm vm create` opts its VMs out of OS Login (enable-oslogin=FALSE in their
    metadata), and where OS Login is in force the launcher logs in as the caller's OS Login user,
    so the project's setting stops nobody by itself (an IAM role missing for OS Login would, and
    checking it would mean importing a key: a doctor changes nothing). Hence ! at most, never ✗."""
    try:
        on = compute.os_login_in_force(project)
    except LauncherError as e:
        return Check("OS Login", Mark.WARN, f"cannot tell ({e})",
                     "if it is on, VMs `mllm vm create` makes still opt out (enable-oslogin=FALSE)")
    if not on:
        return Check("OS Login", Mark.OK, f"off for project {project}: the launcher's key logs in as root")
    return Check("OS Login", Mark.WARN, f"on for project {project} ({cloud.OS_LOGIN_KEY}=TRUE)",
                 "VMs `mllm vm create` makes opt out (enable-oslogin=FALSE), so the launcher's key still logs "
                 "in as root unless your organization enforces OS Login; then pass --os-login: the launcher "
                 "logs in as your OS Login user, which needs roles/compute.osLogin on the project")


def check_ssh_key() -> Check:
    """The launcher's SSH key: present and private (0600), or made on the first `mllm vm create`."""
    private, public = keys.key_paths()
    if not private.exists():
        return Check("SSH key", Mark.OK, f"none yet: `mllm vm create` makes {private} (0600)")
    mode = private.stat().st_mode & 0o777
    if mode & ~_KEY_MODE:
        return Check("SSH key", Mark.FAIL, f"{private} has mode {mode:04o} (ssh refuses a key others can read)",
                     f"chmod 600 {private}")
    if not public.exists():
        return Check("SSH key", Mark.FAIL, f"{public} is missing",
                     f"ssh-keygen -y -f {private} > {public}")
    return Check("SSH key", Mark.OK, f"{private} (0600)")


def check_bucket(url: str, timeout: float) -> Check:
    """The caller can write, read back and delete an object under the bucket (the probe a
    worker runs before a launch, here with the laptop's credentials), within `timeout` seconds."""
    from mllm_jax.bucket_probe import probe
    from mllm_jax.contracts import BucketProbe

    name = f"bucket {url}"
    found: list[BucketProbe] = []
    worker = threading.Thread(target=lambda: found.append(probe(url)), daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        return Check(name, Mark.FAIL, f"no answer from GCS in {timeout:g}s", "check the network and the bucket name")
    result = found[0]
    if result["ok"]:
        return Check(name, Mark.OK, "writable (a probe object written, read back and deleted)")
    if result["status"] == 403:
        return Check(name, Mark.FAIL, f"no write permission ({result['error']})",
                     "grant your account roles/storage.objectUser on the bucket")
    if result["status"] == 404:
        return Check(name, Mark.FAIL, f"no such bucket ({result['error']})", "create it or fix --bucket")
    return Check(name, Mark.FAIL, result["error"], "check the bucket and your credentials")


def check_wandb(env_file: Path) -> Check:
    """A W&B key in the env file `mllm env push` sends (its value is never printed)."""
    from launcher import remote

    fix = f"runs log to W&B offline or not at all; put {WANDB_KEY}=... in {env_file}, then `mllm env push`"
    if not env_file.is_file():
        return Check("W&B", Mark.WARN, f"no {env_file}", fix)
    try:
        names = remote.normalized_env(env_file)[1]
    except LauncherError as e:
        return Check("W&B", Mark.WARN, str(e).removeprefix("--src "), fix)
    if WANDB_KEY in names:
        return Check("W&B", Mark.OK, f"{WANDB_KEY} in {env_file}")
    return Check("W&B", Mark.WARN, f"no {WANDB_KEY} in {env_file}", fix)


# -- all of them ---------------------------------------------------------------------------------


def run_checks(zone: str | None, project: str | None, accelerator_type: str = "v6e-8", version: str = "auto",
               bucket: str | None = None, env_file: Path = Path(".env"),
               bucket_timeout: float = BUCKET_PROBE_TIMEOUT_SEC) -> list[Check]:
    """Every check, in order. Malformed input (zone, type, project or bucket syntax) raises
    LauncherError before anything is checked; a check that cannot run for want of an earlier
    one is skipped, never attempted (no credentials: no API call at all)."""
    from launcher import cluster

    zone = cloud.check_zone(state.resolve("zone", zone, "--zone"))
    cloud.check_type(accelerator_type)
    if project:
        cloud.check_project(project)
    bucket = state.resolve("bucket", bucket, "--bucket", required=False)
    bucket = cluster.check_bucket(bucket) if bucket else None

    credentials = check_credentials()
    project_check, project_id = check_project(project)
    checks = [credentials, project_check]
    api_names = ["Cloud TPU API", f"accelerator type {accelerator_type}", "runtime version", "OS Login"]
    if not credentials.ok or project_id is None:
        checks += [skipped(n, "credentials" if not credentials.ok else "a project") for n in api_names]
    else:
        z = cloud.Zone(project_id, zone, cloud.make_client())
        api = check_api(z)
        checks.append(api)
        if api.ok:
            checks += [check_accelerator_type(z, accelerator_type), check_runtime_version(z, accelerator_type, version)]
        else:
            checks += [skipped(n, "the Cloud TPU API") for n in api_names[1:3]]
        checks.append(check_os_login(project_id))
    checks.append(check_ssh_key())
    if bucket:
        checks.append(check_bucket(bucket, bucket_timeout) if credentials.ok else skipped(f"bucket {bucket}", "credentials"))
    checks.append(check_wandb(env_file))
    return checks
