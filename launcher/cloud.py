"""TPU VMs through the Cloud TPU API v2 (`google-cloud-tpu`), no gcloud binary.

Credentials are google-auth's Application Default Credentials. `MLLM_TPU_API_ENDPOINT`
(e.g. http://127.0.0.1:8080) points the client at another server over REST with anonymous
credentials: that is how the tests run it against a local Cloud TPU REST server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import google.auth.exceptions
import requests
from google.api_core import exceptions as gexc
from google.api_core import operation
from google.api_core import retry as gretry
from google.cloud import tpu_v2
from google.protobuf import field_mask_pb2, json_format
from google.rpc import code_pb2

from launcher.errors import LauncherError

ENV_ENDPOINT = "MLLM_TPU_API_ENDPOINT"
# Runtime image per TPU generation when --version auto (the seed runbooks' choices).
RUNTIME_VERSIONS = {
    "v6e": "v6e-ubuntu-2404",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v4": "tpu-ubuntu2204-base",
}
_TYPE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# A project id: 6-30 lowercase letters, digits and hyphens, starting with a letter, not ending
# with a hyphen; or a legacy one scoped by a domain, `example.com:proj`.
_PROJECT = re.compile(r"^(?:[a-z][-a-z0-9]{4,28}[a-z0-9]"
                      r"|[a-z0-9][-a-z0-9]*(?:\.[a-z0-9][-a-z0-9]*)+:[a-z][-a-z0-9]{0,61}[a-z0-9])$")


def check_zone(zone: str) -> str:
    if not _ZONE.match(zone):
        raise LauncherError(f"--zone {zone!r}: expected a zone such as us-east1-d")
    return zone


_SLICE_SIZES = {"v6e": (1, 4, 8, 16, 32, 64, 128, 256), "v5litepod": (1, 4, 8, 16, 32, 64, 128, 256)}
"""Chips of the single- and multi-host slices v5e and v6e come in; v4 and v5p count TensorCores
(two per chip), in multiples of 8."""
_VERSION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_RESERVATION = re.compile(r"^(projects/[a-z][-a-z0-9.:]*[a-z0-9]/locations/[a-z]+-[a-z]+\d+-[a-z]/reservations/)?"
                          r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_VALID_FOR = datetime.timedelta(days=365)


def check_type(accelerator_type: str) -> str:
    match = _TYPE.match(accelerator_type)
    size = int(match.group(2)) if match else 0
    sizes = _SLICE_SIZES.get(match.group(1)) if match else None
    if not match or (size not in sizes if sizes else size < 8 or size % 8):
        raise LauncherError(
            f"--type {accelerator_type!r}: expected <generation>-<size> with generation one of "
            f"{', '.join(RUNTIME_VERSIONS)} (e.g. v6e-8; v6e/v5litepod sizes {', '.join(map(str, _SLICE_SIZES['v6e']))}; "
            "v4/v5p a multiple of 8)"
        )
    return accelerator_type


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise LauncherError(f"--vm {name!r}: expected lowercase letters, digits and '-', starting with a letter")
    return name


def runtime_version(accelerator_type: str, version: str) -> str:
    """The runtime image: as given, or the generation's default for `auto`."""
    if version == "auto":
        return RUNTIME_VERSIONS[check_type(accelerator_type).split("-")[0]]
    if not _VERSION.match(version):
        raise LauncherError(f"--version {version!r}: expected a runtime version such as v6e-ubuntu-2404, or auto")
    return version


def check_project(project: str) -> str:
    if not _PROJECT.match(project):
        raise LauncherError(f"--project {project!r}: expected a GCP project id (6-30 lowercase letters, digits and "
                            "hyphens, starting with a letter; or a legacy example.com:proj)")
    return project


def make_client() -> tpu_v2.TpuClient:
    """The Cloud TPU client over REST, the transport the tests drive (gRPC is never shipped
    untested); with $MLLM_TPU_API_ENDPOINT, that server with anonymous credentials."""
    endpoint = os.environ.get(ENV_ENDPOINT)
    with api_errors("connecting to the Cloud TPU API"):  # no credentials (ADC) is an error here
        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            return tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": endpoint})
        return tpu_v2.TpuClient(transport="rest")


def resolve_project(given: str | None) -> str:
    """--project, MLLM_PROJECT, CLOUDSDK_CORE_PROJECT, then the ADC project."""
    project = given or os.environ.get("MLLM_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
    if not project and not os.environ.get(ENV_ENDPOINT):
        import google.auth

        with contextlib.suppress(Exception):
            project = google.auth.default()[1]
    if not project:
        raise LauncherError("no project: pass --project, or set MLLM_PROJECT or CLOUDSDK_CORE_PROJECT")
    return check_project(project)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn the API's refusals, and failures to reach it or to authenticate, into one clear line.
    Every call of the API goes through here. (Over REST the client raises by HTTP status:
    Forbidden, BadRequest, Conflict, TooManyRequests; operations raise by gRPC code; the
    transport raises requests' or google-auth's errors.)"""
    try:
        yield
    except gexc.NotFound as e:
        raise LauncherError(f"{what}: not found ({e.message})") from None
    except (gexc.Forbidden, gexc.PermissionDenied) as e:
        raise LauncherError(f"{what}: permission denied ({e.message}); check the project and your credentials") from None
    except (gexc.ResourceExhausted, gexc.TooManyRequests) as e:
        raise LauncherError(f"{what}: quota or capacity exhausted ({e.message})") from None
    except (gexc.BadRequest, gexc.InvalidArgument) as e:
        raise LauncherError(f"{what}: invalid argument ({e.message})") from None
    except (gexc.Conflict, gexc.AlreadyExists) as e:
        raise LauncherError(f"{what}: already exists ({e.message})") from None
    except gexc.GoogleAPICallError as e:
        raise LauncherError(f"{what}: {type(e).__name__} ({e.message})") from None
    except gexc.RetryError as e:
        raise LauncherError(f"{what}: gave up retrying ({_reason(e.cause or e)})") from None
    except (requests.exceptions.RequestException, google.auth.exceptions.TransportError) as e:
        endpoint = os.environ.get(ENV_ENDPOINT) or DEFAULT_HOST
        raise LauncherError(f"{what}: cannot reach the Cloud TPU API at {endpoint} ({_reason(e)})") from None
    except google.auth.exceptions.GoogleAuthError as e:
        raise LauncherError(f"{what}: no usable credentials ({_reason(e)}); run "
                            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None


def _reason(e: BaseException) -> str:
    """The gist of a transport error, on one line: its OS error where it wraps one
    ("[Errno 111] Connection refused"), else its first line."""
    text = str(e)
    errno_text = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno_text:
        return errno_text[-1].strip()
    return " ".join((text.strip().splitlines() or [type(e).__name__])[0].split())[:200]


DEFAULT_HOST = "https://tpu.googleapis.com"
DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TRANSIENT = (gexc.ServiceUnavailable, gexc.TooManyRequests, gexc.DeadlineExceeded, gexc.InternalServerError,
             gexc.GatewayTimeout, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
             google.auth.exceptions.TransportError)
"""What a bad minute of the API looks like (503, 429, DEADLINE_EXCEEDED, a reset connection, a
credential refresh that could not reach its server): worth asking again."""


def _transient(e: Exception) -> bool:
    """A bad minute, not a wrong address: Google's front end never refuses a connection, so a
    refused one (a mistyped endpoint, a proxy that is down) fails at once."""
    return isinstance(e, TRANSIENT) and "Connection refused" not in str(e)


READ_RETRY = gretry.Retry(predicate=_transient, initial=0.5, maximum=10.0, multiplier=2.0, timeout=120.0)
"""Every read call of the API goes through this: the generated client retries nothing by itself."""
OS_LOGIN_KEY = "enable-oslogin"
SSH_KEYS = "ssh-keys"
# Queued-resource states from which no node will ever come: they only hold quota.
DEAD_QUEUED_STATES = ("FAILED", "SUSPENDED")
# Queued-resource states of a request still on its way to a node: waiting keeps its place.
WAITING_QUEUED_STATES = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str, flag: str) -> datetime.timedelta:
    """`6h`, `90m`, `1d12h`, `3600s` -> a timedelta (gcloud's duration style)."""
    match = _DURATION.match(text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise LauncherError(f"{flag} {text!r}: expected a duration such as 6h, 90m, 1d12h or 3600s")
    d, h, m, s = (int(g or 0) for g in match.groups())
    total = d * 86400 + h * 3600 + m * 60 + s
    if not 0 < total <= MAX_VALID_FOR.total_seconds():
        raise LauncherError(f"{flag} {text!r}: expected a duration above 0s and at most {MAX_VALID_FOR.days}d")
    return datetime.timedelta(seconds=total)


@dataclass
class Request:
    """One API request as --dry-run prints it (method, URL, JSON body), sent by nobody."""

    method: str
    path: str
    body: dict | None = None

    def text(self) -> str:
        base = os.environ.get(ENV_ENDPOINT) or DEFAULT_HOST
        line = f"{self.method} {base.rstrip('/')}/v2/{self.path}"
        return line + ("\n" + json.dumps(self.body, indent=2) if self.body is not None else "")


def as_json(message: Any) -> dict:
    """A proto-plus message as the REST body the client would send (fields left unset omitted)."""
    return json_format.MessageToDict(type(message).pb(message))


@dataclass
class Zone:
    """One project's zone in the Cloud TPU API."""

    project: str
    zone: str
    client: tpu_v2.TpuClient

    @classmethod
    def resolve(cls, zone: str | None, project: str | None) -> Zone:
        """The zone and project given, else remembered or from the environment (launcher.state)."""
        from launcher import state

        zone = check_zone(state.resolve("zone", zone, "--zone"))
        project = resolve_project(state.resolve("project", project, "--project", required=False))
        return cls(project, zone, make_client())

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def node_path(self, name: str) -> str:
        return f"{self.parent}/nodes/{name}"

    def queued_path(self, name: str) -> str:
        return f"{self.parent}/queuedResources/{name}"

    # -- nodes ---------------------------------------------------------------------------

    @staticmethod
    def node_spec(req: VmRequest, spot: bool, ssh_public_key: str) -> tpu_v2.Node:
        """The TPU VM the launcher asks for: its network and identity as requested, our label, and
        our SSH key for root with OS Login off for this VM (unless it asked for OS Login), so a
        project that turns OS Login on does not lock the launcher out of the VM it just made."""
        node = tpu_v2.Node(
            accelerator_type=req.accelerator_type,
            runtime_version=req.version,
            network_config=tpu_v2.NetworkConfig(enable_external_ips=req.net.external_ip, network=req.net.network or "",
                                                subnetwork=req.net.subnetwork or ""),
            scheduling_config=tpu_v2.SchedulingConfig(spot=spot),
            labels={"created-by": "mllm"},
            tags=list(req.net.tags),
            metadata={OS_LOGIN_KEY: "TRUE"} if req.os_login else {SSH_KEYS: f"root:{ssh_public_key}",
                                                                  OS_LOGIN_KEY: "FALSE"},
        )
        if req.net.service_account:
            node.service_account = tpu_v2.ServiceAccount(email=req.net.service_account, scope=list(req.net.scopes))
        return node

    def create_request(self, name: str, node: tpu_v2.Node) -> Request:
        return Request("POST", f"{self.parent}/nodes?nodeId={name}", as_json(node))

    def create(self, name: str, node: tpu_v2.Node, timeout: float, wait: bool = True) -> tpu_v2.Node | None:
        with api_errors(f"creating TPU VM {name} in {self.zone}"):
            op = self.client.create_node(parent=self.parent, node=node, node_id=name)
            return wait_for(op, timeout, f"creating {name} ({node.accelerator_type})",
                            f"it is still being created: `mllm vm list` shows it, `mllm vm delete {name}` "
                            "removes it") if wait else None

    def get(self, name: str) -> tpu_v2.Node:
        with api_errors(f"TPU VM {name} in {self.zone}"):
            return self.client.get_node(name=self.node_path(name), retry=READ_RETRY)

    def find(self, name: str) -> tpu_v2.Node | None:
        """The node, or None when it does not exist (other refusals are one-line errors)."""
        with api_errors(f"TPU VM {name} in {self.zone}"):
            try:
                return self.client.get_node(name=self.node_path(name), retry=READ_RETRY)
            except gexc.NotFound:
                return None

    def list(self) -> list[tpu_v2.Node]:
        with api_errors(f"listing TPU VMs in {self.zone}"):
            return list(self.client.list_nodes(parent=self.parent, retry=READ_RETRY))

    def set_metadata(self, node: tpu_v2.Node, metadata: dict[str, str], timeout: float = 300) -> None:
        """Replace the node's metadata (UpdateNode, update mask `metadata`), as gcloud does to
        add an SSH key; the caller keeps every entry it does not mean to change."""
        name = node.name.rsplit("/", 1)[-1]
        with api_errors(f"updating the metadata of TPU VM {name}"):
            op = self.client.update_node(node=tpu_v2.Node(name=node.name, metadata=metadata),
                                         update_mask=field_mask_pb2.FieldMask(paths=["metadata"]))
            wait_for(op, timeout, f"adding the SSH key to {name}")

    def delete_request(self, name: str) -> Request:
        return Request("DELETE", self.node_path(name))

    def delete(self, name: str, timeout: float) -> None:
        with api_errors(f"deleting TPU VM {name} in {self.zone}"):
            wait_for(self.client.delete_node(name=self.node_path(name)), timeout, f"deleting {name}")

    def host_keys(self, name: str) -> dict[int, dict[str, str]]:
        """Worker index -> {key type: base64 key} as the VM's guest agent published them; {} with
        one warning where guest attributes are refused (org policy
        compute.disableGuestAttributesAccess, an old TPU): the workers' keys are then pinned on
        first use, as gcloud does."""
        with api_errors(f"host keys of {name}"):
            try:
                resp = self.client.get_guest_attributes(request={"name": self.node_path(name), "query_path": "hostkeys/"},
                                                        retry=READ_RETRY)
            except (gexc.Forbidden, gexc.NotFound, gexc.MethodNotImplemented) as e:
                print(f"warning: TPU VM {name} publishes no host keys (guest attributes: {e.code.name if e.code else ''}"
                      f" {e.message}); trusting each worker's key on first use", file=sys.stderr)
                return {}
        keys: dict[int, dict[str, str]] = {}
        for worker, attrs in enumerate(resp.guest_attributes):  # one entry per worker, in worker order
            for item in attrs.query_value.items:
                if item.namespace == "hostkeys":
                    keys.setdefault(worker, {})[item.key] = item.value
        return keys

    # -- what `mllm vm create` sends -------------------------------------------------------

    def _specs(self, req: VmRequest, public_key: str) -> tuple[tpu_v2.Node, tpu_v2.QueuedResource | None]:
        node = self.node_spec(req, req.capacity == "spot" and not req.queued, public_key)
        qr = self.queued_spec(req.name, node, req.capacity, req.reservation, req.valid_for) if req.queued else None
        return node, qr

    def create_vm_request(self, req: VmRequest, public_key: str) -> Request:
        node, qr = self._specs(req, public_key)
        return self.create_queued_request(req.name, qr) if qr else self.create_request(req.name, node)

    def create_vm(self, req: VmRequest, public_key: str, timeout: float, poll: float, wait: bool = True,
                  on_accepted: Callable[[], None] = lambda: None) -> tpu_v2.Node | None:
        """Create the VM (directly, or through a queued resource whose queue is watched); None
        with `wait=False`. `on_accepted` runs once the API has taken the request."""
        node, qr = self._specs(req, public_key)
        if qr is None:
            created = self.create(req.name, node, timeout, wait=wait)
            on_accepted()
            return created
        op = self.create_queued(req.name, qr)
        on_accepted()
        return wait_queued(self, req.name, timeout, poll, op) if wait else None

    # -- queued resources ------------------------------------------------------------------

    def queued_spec(self, name: str, node: tpu_v2.Node, capacity: str, reservation: str | None,
                    valid_for: datetime.timedelta | None) -> tpu_v2.QueuedResource:
        """A queued resource for one node named like it: spot, guaranteed or in a reservation."""
        qr = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[
            tpu_v2.QueuedResource.Tpu.NodeSpec(parent=self.parent, node_id=name, node=node)]))
        if capacity == "spot":
            qr.spot = tpu_v2.QueuedResource.Spot()
        elif capacity == "guaranteed":
            qr.guaranteed = tpu_v2.QueuedResource.Guaranteed()
        if reservation:
            qr.reservation_name = (reservation if reservation.startswith("projects/")
                                   else f"{self.parent}/reservations/{reservation}")
        if valid_for is not None:
            qr.queueing_policy = tpu_v2.QueuedResource.QueueingPolicy(valid_until_duration=valid_for)
        return qr

    def create_queued_request(self, name: str, qr: tpu_v2.QueuedResource) -> Request:
        return Request("POST", f"{self.parent}/queuedResources?queuedResourceId={name}", as_json(qr))

    def create_queued(self, name: str, qr: tpu_v2.QueuedResource) -> operation.Operation:
        """Send the request; the queue is then watched with `wait_queued`, which also reads the
        returned operation: it only says whether the request was accepted, but a refused one (a
        type or runtime not offered in the zone) leaves no queued resource to watch."""
        with api_errors(f"queueing TPU VM {name} in {self.zone}"):
            return self.client.create_queued_resource(parent=self.parent, queued_resource=qr, queued_resource_id=name)

    def find_queued(self, name: str) -> tpu_v2.QueuedResource | None:
        """The queued resource, or None when it does not exist (other refusals are one-line errors)."""
        with api_errors(f"queued resource {name} in {self.zone}"):
            try:
                return self.client.get_queued_resource(name=self.queued_path(name), retry=READ_RETRY)
            except gexc.NotFound:
                return None

    def list_queued(self) -> list[tpu_v2.QueuedResource]:
        with api_errors(f"listing queued resources in {self.zone}"):
            return list(self.client.list_queued_resources(parent=self.parent, retry=READ_RETRY))

    def delete_queued_request(self, name: str) -> Request:
        return Request("DELETE", f"{self.queued_path(name)}?force=true")

    def delete_queued(self, name: str, timeout: float) -> None:
        """Delete a queued resource and, with it (force), its node if there is one."""
        with api_errors(f"deleting queued resource {name} in {self.zone}"):
            op = self.client.delete_queued_resource(request={"name": self.queued_path(name), "force": True})
            wait_for(op, timeout, f"deleting queued resource {name}")


_NETWORK = re.compile(r"^(projects/[a-z][-a-z0-9.:]*[a-z0-9]/(global|regions/[a-z]+-[a-z]+\d+)/(networks|subnetworks)/)?"
                      r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_TAG = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_EMAIL = re.compile(r"^[a-z0-9][-a-z0-9._]*@[a-z0-9][-a-z0-9.]*\.[a-z]+$")
_SCOPE = re.compile(r"^https://www\.googleapis\.com/auth/[a-z0-9._-]+$")


@dataclass
class Network:
    """Where a VM's workers live and who they are: a managed project's VPC, subnetwork, internal
    addresses only, firewall tags, and the service account (with its scopes) the VM runs as."""

    network: str | None = None
    subnetwork: str | None = None
    external_ip: bool = True
    tags: tuple[str, ...] = ()
    service_account: str | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    @classmethod
    def checked(cls, network: str | None = None, subnetwork: str | None = None, external_ip: bool = True,
                tags: list[str] | tuple[str, ...] = (), service_account: str | None = None,
                scopes: list[str] | tuple[str, ...] = ()) -> Network:
        for flag, value in (("--network", network), ("--subnetwork", subnetwork)):
            if value is not None and not _NETWORK.match(value):
                raise LauncherError(f"{flag} {value!r}: expected a name such as default, or "
                                    "projects/P/global/networks/N (projects/P/regions/R/subnetworks/S)")
        for tag in tags:
            if not _TAG.match(tag):
                raise LauncherError(f"--tag {tag!r}: expected lowercase letters, digits and '-', starting with a letter")
        if service_account is not None and not _EMAIL.match(service_account):
            raise LauncherError(f"--service-account {service_account!r}: expected an email such as "
                                "trainer@PROJECT.iam.gserviceaccount.com")
        for scope in scopes:
            if not _SCOPE.match(scope):
                raise LauncherError(f"--scopes {scope!r}: expected an OAuth scope URL such as {DEFAULT_SCOPES[0]}")
        if scopes and service_account is None:
            raise LauncherError("--scopes needs --service-account")
        return cls(network, subnetwork, external_ip, tuple(dict.fromkeys(tags)), service_account,
                   tuple(scopes) or DEFAULT_SCOPES)


@dataclass
class VmRequest:
    """What `mllm vm create` asks for, checked before anything is sent; the watch plan keeps its
    fields, so a VM created again is the same VM (network, identity and OS Login included)."""

    name: str
    accelerator_type: str
    version: str
    capacity: str
    """spot | guaranteed | reserved"""
    queued: bool
    reservation: str | None
    valid_for: datetime.timedelta | None
    net: Network = field(default_factory=Network)
    os_login: bool = False
    """Log in as the user's OS Login account (its key imported through the OS Login API) instead
    of root with a metadata key; off by default (the VM's metadata says enable-oslogin=FALSE)."""

    @classmethod
    def checked(cls, name: str | None, accelerator_type: str, version: str, spot: bool, queued: bool,
                guaranteed: bool, reserved: str | None, valid_for: str | None, net: Network = Network(),
                os_login: bool = False) -> VmRequest:
        check_type(accelerator_type)
        if not queued and (guaranteed or reserved or valid_for):
            raise LauncherError("--guaranteed, --reserved and --valid-for need --queued")
        if guaranteed and reserved:
            raise LauncherError("--guaranteed and --reserved: give one (a reservation is its own capacity)")
        if reserved is not None and not _RESERVATION.match(reserved):
            raise LauncherError(f"--reserved {reserved!r}: expected a reservation name, or "
                                "projects/P/locations/ZONE/reservations/NAME")
        name = check_name(name or f"mllm-{accelerator_type}-{time.strftime('%y%m%d%H%M%S', time.gmtime())}")
        capacity = "reserved" if reserved else "guaranteed" if guaranteed or not spot else "spot"
        return cls(name, accelerator_type, runtime_version(accelerator_type, version), capacity, queued, reserved,
                   parse_duration(valid_for, "--valid-for") if valid_for else None, net, os_login)

    @classmethod
    def of_node(cls, node: tpu_v2.Node, qr: tpu_v2.QueuedResource | None) -> VmRequest:
        """The request that makes this node again (what the supervisor records before a preemption)."""
        capacity = ("reserved" if qr is not None and qr.reservation_name else
                    "spot" if (qr is not None and "spot" in qr) or node.scheduling_config.spot else "guaranteed")
        config = node.network_config
        net = Network(config.network or None, config.subnetwork or None, bool(config.enable_external_ips),
                      tuple(node.tags), node.service_account.email or None,
                      tuple(node.service_account.scope) or DEFAULT_SCOPES)
        return cls(node.name.rsplit("/", 1)[-1], node.accelerator_type, node.runtime_version, capacity, qr is not None,
                   qr.reservation_name if qr is not None and qr.reservation_name else None, None, net,
                   node.metadata.get(OS_LOGIN_KEY, "").upper() == "TRUE")

    def record(self) -> dict[str, Any]:
        """The request as the watch plan keeps it (JSON; valid_for is not kept: a recreate does not queue)."""
        return {**asdict(self), "valid_for": None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> VmRequest:
        """A request from its `record()`."""
        net = record.get("net") or {}
        return cls(**{**record, "valid_for": None,
                      "net": Network(**{**net, "tags": tuple(net.get("tags", ())),
                                        "scopes": tuple(net.get("scopes", DEFAULT_SCOPES))})})

    def describe(self, zone: str, created: tpu_v2.Node | None) -> str:
        if created is None:
            return (f"{'queued' if self.queued else 'requested'} {self.name} ({self.accelerator_type}, {self.capacity}) "
                    f"in {zone}; watch it with `mllm vm list`")
        return (f"created {self.name} ({self.accelerator_type}, {self.version}, {self.capacity}) in {zone}: "
                f"{created.state.name}, workers {', '.join(worker_ips(created))}")


def queued_state(qr: tpu_v2.QueuedResource) -> str:
    return qr.state.state.name


def queued_reason(qr: tpu_v2.QueuedResource) -> str:
    """Why a queued resource is dead, in the API's words where it gives them."""
    message = qr.state.failed_data.error.message if "failed_data" in qr.state else ""
    if message:
        return message
    if queued_state(qr) == "SUSPENDED":
        return "its capacity was reclaimed (spot preemption or maintenance)"
    return "no reason given by the API"


def queued_node_id(qr: tpu_v2.QueuedResource) -> str:
    return qr.tpu.node_spec[0].node_id if qr.tpu.node_spec else qr.name.rsplit("/", 1)[-1]


class StillQueued(LauncherError):
    """A queued resource that is still waiting (or provisioning) when the wait ran out: it keeps
    its place in the queue."""


def wait_queued(z: Zone, name: str, timeout: float, poll: float, op: operation.Operation | None = None) -> tpu_v2.Node:
    """Watch a queued resource until its node is READY; a dead one (FAILED, SUSPENDED) is
    deleted (it would only hold quota) and reported with the API's reason; a create operation
    (`op`) that failed is reported at once, in the API's words."""
    from rich.console import Console

    console = Console(stderr=True)
    start, last = time.monotonic(), None
    with console.status(f"queued resource {name}: CREATING") as status:
        while True:
            elapsed = time.monotonic() - start
            qr = z.find_queued(name)
            if op is not None and qr is None and _failed(op):
                raise LauncherError(f"queueing TPU VM {name} in {z.zone} failed: {_failed(op)}")
            state = queued_state(qr) if qr is not None else "CREATING"
            line = f"queued resource {name}: {state} ({elapsed:.0f}s)"
            status.update(line)
            if state != last:
                console.print(line, highlight=False, markup=False)
                last = state
            if state in DEAD_QUEUED_STATES:
                reason = queued_reason(qr)
                z.delete_queued(name, timeout=300)
                raise LauncherError(f"queued resource {name} in {z.zone} is {state}: {reason} (deleted it)")
            if state == "ACTIVE":
                node = z.find(queued_node_id(qr))
                if node is not None and node.state.name == "READY":
                    return node
            if elapsed > timeout:
                raise StillQueued(f"queued resource {name} is still {state} after {timeout:.0f}s; it stays queued "
                                    f"(watch it with `mllm vm list`, remove it with `mllm vm delete {name}`)")
            time.sleep(poll)


def _failed(op: operation.Operation) -> str:
    """Why a finished operation failed ("" while it runs, or when it succeeded)."""
    with api_errors(f"operation {op.operation.name}"):
        try:
            if not op.done(retry=READ_RETRY):
                return ""
        except TRANSIENT:
            return ""
    if not op.operation.HasField("error"):
        return ""
    return f"{code_pb2.Code.Name(op.operation.error.code)}: {op.operation.error.message}"


def list_zones(project: str, client: tpu_v2.TpuClient) -> list[str]:
    """Every zone where the Cloud TPU API offers TPUs to this project."""
    with api_errors(f"listing TPU zones of {project}"):
        resp = client.list_locations(request={"name": f"projects/{project}"}, retry=READ_RETRY)
    return sorted(loc.location_id for loc in resp.locations)


def vm_rows(z: Zone, now: float) -> list[dict[str, Any]]:
    """Nodes and queued resources of a zone, one row per name: a queued resource that has its
    node shares the node's row (`queued` = its state); one still waiting, or dead, has its own."""
    queued = {q.name.rsplit("/", 1)[-1]: q for q in z.list_queued()}
    by_node = {queued_node_id(q): q for q in queued.values()}
    rows = []
    for node in z.list():
        name = node.name.rsplit("/", 1)[-1]
        qr = (queued.get(node.queued_resource.rsplit("/", 1)[-1]) if node.queued_resource else None) or by_node.get(name)
        rows.append({
            "name": name, "zone": z.zone, "type": node.accelerator_type, "state": node.state.name,
            "health": node.health.name if node.health else "", "workers": len(node.network_endpoints),
            "ips": worker_ips(node),
            "spot": bool(node.scheduling_config.spot or node.scheduling_config.preemptible or (qr and "spot" in qr)),
            "queued": queued_state(qr) if qr else None,
            "queued_resource": qr.name.rsplit("/", 1)[-1] if qr else None,
            "age_sec": int(now - (node.create_time.timestamp() if node.create_time else now)),
            "runtime_version": node.runtime_version,
        })
    with_node = {r["queued_resource"] for r in rows}
    for qr_name, qr in queued.items():
        if qr_name in with_node:
            continue
        spec = qr.tpu.node_spec[0].node if qr.tpu.node_spec else None
        state = queued_state(qr)
        rows.append({
            "name": queued_node_id(qr), "zone": z.zone, "type": spec.accelerator_type if spec else "",
            "state": state, "health": "", "workers": 0, "ips": [], "spot": "spot" in qr,
            "queued": state, "queued_resource": qr_name,
            "age_sec": int(now - (qr.create_time.timestamp() if qr.create_time else now)),
            "runtime_version": spec.runtime_version if spec else "",
            **({"reason": queued_reason(qr)} if state in DEAD_QUEUED_STATES else {}),
        })
    return sorted(rows, key=lambda r: r["name"])


def vm_rows_all_zones(project: str, client: tpu_v2.TpuClient, now: float) -> list[dict[str, Any]]:
    """`vm_rows` of every TPU zone of the project, the zones asked in parallel."""
    zones = [Zone(project, name, client) for name in list_zones(project, client)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return [row for rows in pool.map(lambda z: vm_rows(z, now), zones) for row in rows]


@dataclass
class Deletion:
    """One thing `vm delete` removes: what to call it, the request, and how to send it."""

    what: str
    request: Request
    run: Callable[[float], None]


def deletion(z: Zone, name: str) -> Deletion:
    """Delete a VM by name: its queued resource (forced, so the node goes too) when it has one,
    else the node. Neither existing is an error."""
    node, qr = z.find(name), z.find_queued(name)
    if qr is None and node is not None and node.queued_resource:
        qr = z.find_queued(node.queued_resource.rsplit("/", 1)[-1])
    if qr is not None:
        qr_name = qr.name.rsplit("/", 1)[-1]
        what = f"{name} (VM and queued resource {qr_name})" if node is not None else f"queued resource {qr_name}"
        return Deletion(what, z.delete_queued_request(qr_name), lambda t: z.delete_queued(qr_name, t))
    if node is None:
        raise LauncherError(f"TPU VM {name} in {z.zone}: not found (no node or queued resource of that name)")
    return Deletion(name, z.delete_request(name), lambda t: z.delete(name, t))


def stale(z: Zone) -> list[Deletion]:
    """What only holds quota in a zone: FAILED/SUSPENDED queued resources (with their nodes)
    and PREEMPTED nodes."""
    plan, covered = [], set()
    for qr in z.list_queued():
        if queued_state(qr) in DEAD_QUEUED_STATES:
            qr_name = qr.name.rsplit("/", 1)[-1]
            covered.add(queued_node_id(qr))
            plan.append(Deletion(f"queued resource {qr_name} ({queued_state(qr)})", z.delete_queued_request(qr_name),
                                 lambda t, n=qr_name: z.delete_queued(n, t)))
    for node in z.list():
        node_name = node.name.rsplit("/", 1)[-1]
        if node.state.name == "PREEMPTED" and node_name not in covered:
            plan.append(Deletion(f"{node_name} (PREEMPTED)", z.delete_request(node_name),
                                 lambda t, n=node_name: z.delete(n, t)))
    return plan


def wait_for(op: operation.Operation, timeout: float, what: str, still: str = "") -> Any:
    """Wait for a long-running operation with a spinner; a timeout is a clear error (saying
    what is still going on, `still`)."""
    from rich.console import Console

    with Console(stderr=True).status(f"{what} ..."):
        try:
            return op.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise LauncherError(f"{what}: still running after {timeout:.0f}s (operation {op.operation.name})"
                                f"{'; ' + still if still else ''}") from None


def worker_ips(node: tpu_v2.Node, internal: bool = False) -> list[str]:
    """Worker addresses in worker order: external IPs unless `internal`."""
    return [ep.ip_address if internal or not ep.access_config.external_ip else ep.access_config.external_ip
            for ep in node.network_endpoints]
