"""A local Cloud TPU API v2 REST server, so launcher tests drive the real `google-cloud-tpu` client offline.

Why a server rather than a mock of the client: the launcher's value is in how it uses the real
client (resource names, long-running operations, error classes, guest attributes), and only the
real client over real HTTP shows that. Stdlib only; one `ThreadingHTTPServer` in a daemon thread.

Client construction (checked with google-cloud-tpu 1.28.0, google-api-core 2.44, google-auth 2.63)::

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import tpu_v2

    client = tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": api.endpoint})  # "http://127.0.0.1:PORT"

`transport="rest"` is required (the default gRPC transport cannot talk to this server). An
explicit `http://` in `api_endpoint` is honoured: the REST transport (`rest_base.py`) prepends its
`url_scheme` (default "https") only when the host has no scheme, and the operations client that
`.result()` polls through is built on the same host. So no `url_scheme="http"` transport object is
needed; `FakeTpuApi.client()` returns exactly the client above.

Served (JSON names as in the client's protobuf types; anything else gets a Google-style 404):

- `POST   /v2/projects/{p}/locations/{z}/nodes?nodeId=ID`   create -> Operation
- `GET    /v2/projects/{p}/locations/{z}/nodes`             list -> {"nodes": [...]}
- `GET    /v2/projects/{p}/locations/{z}/nodes/{id}`        get -> Node
- `PATCH  /v2/projects/{p}/locations/{z}/nodes/{id}?updateMask=metadata`  update -> Operation (only
  `metadata` is modelled, as gcloud uses it to add SSH keys; other masks get 400)
- `DELETE /v2/projects/{p}/locations/{z}/nodes/{id}`        delete -> Operation
- `POST   /v2/projects/{p}/locations/{z}/nodes/{id}:getGuestAttributes` -> {"guestAttributes": [...]}
- `POST   /v2/projects/{p}/locations/{z}/queuedResources?queuedResourceId=ID`  create -> Operation
- `GET    /v2/projects/{p}/locations/{z}/queuedResources`   list -> {"queuedResources": [...]}
- `GET    /v2/projects/{p}/locations/{z}/queuedResources/{id}`  get -> QueuedResource
- `DELETE /v2/projects/{p}/locations/{z}/queuedResources/{id}[?force=true]`  delete -> Operation
- `POST   /v2/projects/{p}/locations/{z}/queuedResources/{id}:reset`  -> 501 (not modelled)
- `GET    /v2/projects/{p}/locations`                       list -> {"locations": [...]} (the `zones` arg)
- `GET    /v2/projects/{p}/locations/{z}`                   get -> Location
- `GET    /v2/projects/{p}/locations/{z}/operations/{op}`   poll an Operation
- `GET    /v2/projects/{p}/locations/{z}/acceleratorTypes`  list -> {"acceleratorTypes": [{"name", "type"}]}
- `GET    /v2/projects/{p}/locations/{z}/runtimeVersions`   list -> {"runtimeVersions": [{"name", "version"}]}
  (what a zone offers: the `accelerator_types` / `runtime_versions` args, or `offer(zone, ...)`)
- `POST   /v1/users/{email}:importSshPublicKey?projectId=P`  the OS Login API: the key joins the
  account's login profile -> {"loginProfile": {"name", "posixAccounts": [...], "sshPublicKeys"}}
  (a POSIX user per account, named as Google names them: `alice_example_com`; `on_os_login` is
  told); `GET /v1/users/{email}/loginProfile` reads it (point `MLLM_OSLOGIN_API_ENDPOINT` here)
- `GET    /compute/v1/projects/{p}`   the Compute Engine project -> {"name", "commonInstanceMetadata":
  {"items": [{"key", "value"}]}} (empty unless `set_project_metadata`; point
  `MLLM_COMPUTE_API_ENDPOINT` at `endpoint`)

Behaviour worth knowing (the real client and API do the same):

- Errors are `{"error": {"code", "message", "status"}}`. The REST client maps them by HTTP status,
  not by "status": 403 -> `exceptions.Forbidden`, 400 -> `BadRequest`, 409 -> `Conflict`,
  429 -> `TooManyRequests`, 404 -> `NotFound`. `PermissionDenied`, `InvalidArgument`,
  `AlreadyExists`, `ResourceExhausted` are subclasses of those and are never raised by a REST
  call, so code must catch the HTTP classes. A failed *operation* (`fail_next_operation`) is mapped
  by its google.rpc code, so code 8 raises `ResourceExhausted` from `op.result()`.
- `GuestAttributes` has no worker-id field: the response lists one entry per worker in worker
  order (with `workerIds`, only those workers, in the order asked), as gcloud reads it by position.
- `op.result()` polls with api_core's default polling (first re-poll after up to 1 s), so an
  operation costs about a second of wall time even with the 0.3 s default `op_delay`.
- Enums come back as names, or as numbers when the query has `$alt=json;enum-encoding=int`
  (which the generated REST client always sends, except for the locations mixin); both parse.
- `accessConfig.externalIp` is set only when the create body has `networkConfig.enableExternalIps`
  (as on Google); `ipAddress` is the worker's `internal_ip`, defaulting to its `ip`.
- Zones: any well-formed zone is served (the real API's answer for a real zone without TPUs is not
  known here, so none is invented); `zones` only decides what `list_locations` returns.

Queued resources (QRs), as the real service runs them:

- A QR is ACCEPTED until its create operation completes (`op_delay`); the operation's response is
  the QR then, already WAITING_FOR_RESOURCES (Google's samples show `op.result()` in that state;
  Google's docs say WAITING_FOR_RESOURCES replaced ACCEPTED, so a client must treat both as queued).
  It waits `qr_wait` seconds (or until `release_queued` when `hold_queued`), then PROVISIONING: the
  node is created (CREATING, `queuedResource` = the QR's name, `schedulingConfig.spot` for a spot
  QR) and finishes exactly like a created node (`on_create`, READY) after `op_delay`; then the QR
  is ACTIVE. A failure there (`fail_next_queued_resource`, a failing `on_create`, a node id taken
  meanwhile, `validUntil*` passing while waiting) makes it FAILED with `failedData.error` and
  `stateInitiator` SERVICE; the node is gone.
- `queueingPolicy.valid{Until,After}Duration` comes back as `valid{Until,After}Time` (createTime +
  duration; the fields are a oneof, and Google's sample prints `valid_until_time`), and is obeyed.
- `spot` and `guaranteed` are a oneof: proto-plus keeps only the last one set, so "both" can only
  arrive over raw HTTP; it gets 400. Only one `tpu.nodeSpec` with a `nodeId` is modelled: more
  specs or `multisliceParams` get 501.
- Delete without `force` (the client sends `force=true` only when set) is allowed only in ACCEPTED,
  WAITING_FOR_RESOURCES, SUSPENDED and FAILED; otherwise 400 FAILED_PRECONDITION with the message
  the real API gives ("DeleteQueuedResource is not supported when state is ACTIVE (must be one of
  [...])"). `force` deletes the node too (any state but DELETING). While the delete operation runs
  the QR (and a forced node) is DELETING; then they are gone. A non-forced delete of a SUSPENDED QR
  leaves a PREEMPTED node in place (whether Google removes it too is not known here: a client
  should delete both, or use `force`).
- Preemption (`set_state(node, "PREEMPTED")` on a QR's node) makes the QR SUSPENDING, then after
  `op_delay` SUSPENDED, initiator SERVICE; the node stays listed as PREEMPTED. Deleting a QR's node
  directly (as Google's Java sample does before deleting the QR) makes the QR SUSPENDING, then
  SUSPENDED once the node is gone, initiator USER.
- A QR id, or a node id held by a node or by a QR not yet past PROVISIONING, cannot be reused: 409.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence, TypedDict
from urllib.parse import parse_qs, unquote, urlsplit

ACCELERATOR_TYPE = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-\d+$")
ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
NODE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
RESERVATION = re.compile(r"^projects/[^/]+/locations/[^/]+/reservations/[^/]+$")
DURATION = re.compile(r"^(\d+(\.\d{1,9})?)s$")  # google.protobuf.Duration in JSON: "90s", "1.5s"

NODE_TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2.Node"
QUEUED_RESOURCE_TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2.QueuedResource"
METADATA_TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
EMPTY_TYPE_URL = "type.googleapis.com/google.protobuf.Empty"
WORKER_PORT = 8470
# Zones that offer Cloud TPUs, for `list_locations`; any well-formed zone is served regardless.
DEFAULT_ZONES = ("us-central1-a", "us-central1-b", "us-central2-b", "us-east1-d", "us-east5-b",
                 "us-west4-a", "europe-west4-a", "asia-northeast1-b")
# What every zone offers unless `offer` says otherwise (list_accelerator_types, list_runtime_versions).
DEFAULT_ACCELERATOR_TYPES = (*(f"v6e-{n}" for n in (8, 16, 32, 64, 128, 256)),
                             *(f"v5litepod-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)),
                             *(f"v4-{n}" for n in (8, 16, 32, 64, 128)))
DEFAULT_RUNTIME_VERSIONS = ("tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "v6e-ubuntu-2404")

# google.rpc.Code, and the status a Google API puts next to each HTTP error code.
RPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
STATUS_FOR_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
    501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
# google.cloud.tpu.v2.Node enums, for requests that ask for `enum-encoding=int`.
NODE_ENUMS: dict[str, dict[str, int]] = {
    "state": {
        "STATE_UNSPECIFIED": 0, "CREATING": 1, "READY": 2, "RESTARTING": 3, "REIMAGING": 4,
        "DELETING": 5, "REPAIRING": 6, "STOPPED": 8, "STOPPING": 9, "STARTING": 10,
        "PREEMPTED": 11, "TERMINATED": 12, "HIDING": 13, "HIDDEN": 14, "UNHIDING": 15, "UNKNOWN": 16,
    },
    "health": {
        "HEALTH_UNSPECIFIED": 0, "HEALTHY": 1, "TIMEOUT": 3, "UNHEALTHY_TENSORFLOW": 4,
        "UNHEALTHY_MAINTENANCE": 5,
    },
    "apiVersion": {"API_VERSION_UNSPECIFIED": 0, "V1_ALPHA1": 1, "V1": 2, "V2_ALPHA1": 3, "V2": 4},
}
# google.cloud.tpu.v2.QueuedResourceState enums (the fields of a QR's `state` object), read off the
# installed protos (a test checks them); note WAITING_FOR_RESOURCES is 9, after SUSPENDED.
QUEUED_STATE_ENUMS: dict[str, dict[str, int]] = {
    "state": {
        "STATE_UNSPECIFIED": 0, "CREATING": 1, "ACCEPTED": 2, "PROVISIONING": 3, "FAILED": 4,
        "DELETING": 5, "ACTIVE": 6, "SUSPENDING": 7, "SUSPENDED": 8, "WAITING_FOR_RESOURCES": 9,
    },
    "stateInitiator": {"STATE_INITIATOR_UNSPECIFIED": 0, "USER": 1, "SERVICE": 2},
}
# The `state_data` oneof member of each QR state (WAITING_FOR_RESOURCES has none).
QUEUED_STATE_DATA = {
    "CREATING": "creatingData", "ACCEPTED": "acceptedData", "PROVISIONING": "provisioningData",
    "FAILED": "failedData", "DELETING": "deletingData", "ACTIVE": "activeData",
    "SUSPENDING": "suspendingData", "SUSPENDED": "suspendedData",
}
# States in which the real API deletes a QR without `force` (its own error message lists them).
QUEUED_DELETABLE = ("ACCEPTED", "WAITING_FOR_RESOURCES", "SUSPENDED", "FAILED")
# States in which a QR still owns the name of the node it will make or is making.
QUEUED_CLAIMING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
# Fields the API computes; whatever a create body says about them is ignored, as on Google.
OUTPUT_ONLY = ("name", "state", "healthDescription", "createTime", "networkEndpoints", "health",
               "id", "apiVersion", "symptoms", "queuedResource", "multisliceNode")
QUEUED_OUTPUT_ONLY = ("name", "createTime", "state")
QUEUEING_POLICY_FIELDS = ("validUntilDuration", "validUntilTime", "validAfterDuration", "validAfterTime",
                          "validInterval")


class WorkerHost(TypedDict, total=False):
    """One worker of a node: `ip` (required) is what clients connect to; `internal_ip` defaults to it;
    `host_keys` maps key type ("ssh-ed25519") to an OpenSSH public key line or its bare base64 part."""

    ip: str
    internal_ip: str
    host_keys: dict[str, str]


HostsForNode = Callable[[str, str], "list[WorkerHost]"]
"""(node id, accelerator type) -> the node's workers, in worker order."""


def fake_host_key(seed: str) -> str:
    """A well-formed but made-up ssh-ed25519 public key line, stable for a seed (no sshd needed)."""
    kind = b"ssh-ed25519"
    blob = (len(kind).to_bytes(4, "big") + kind + (32).to_bytes(4, "big")
            + hashlib.sha256(seed.encode()).digest())
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} root@{seed}"


def default_hosts(node_id: str, accelerator_type: str) -> list[WorkerHost]:
    """One worker at 127.0.0.1 with a fake host key: enough for tests that never SSH."""
    return [{"ip": "127.0.0.1", "host_keys": {"ssh-ed25519": fake_host_key(f"{node_id}-w0")}}]


def rfc3339(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(timezone.utc))


@dataclass
class RecordedRequest:
    """One request as the server saw it, for tests that assert on what a client sent."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


class ApiError(Exception):
    """A Google-style error response: HTTP status, message, and the google.rpc status name."""

    def __init__(self, http_status: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.status = status or STATUS_FOR_HTTP.get(http_status, "UNKNOWN")

    def payload(self) -> dict[str, Any]:
        return {"error": {"code": self.http_status, "message": self.message, "status": self.status}}


@dataclass
class _Failure:
    error: ApiError
    method: str | None
    path: str | None
    times: int


@dataclass
class _Operation:
    name: str
    verb: str  # "create" | "delete" | "update"
    target: str  # the full resource name of the node or queued resource
    due: float  # time.monotonic() at which it completes
    create_time: str
    planned_error: dict[str, Any] | None = None
    prior_state: str | None = None  # delete: the node's state before DELETING, restored on failure
    done: bool = False
    end_time: str | None = None
    error: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None  # create: the resource as it was when the operation finished
    queued: str | None = None  # the QR a node operation works for (provisioning, or a direct node delete)
    prior_queued: dict[str, Any] | None = None  # the QR's `state` before this operation, restored on failure
    force: bool = False  # QR delete: delete the node too
    patch: dict[str, Any] | None = None  # update: the fields it sets


@dataclass
class _Queued:
    """A queued resource's JSON plus what drives its lifecycle (all times are time.monotonic())."""

    json: dict[str, Any]
    node_name: str  # the node its single nodeSpec makes
    timer: float | None = None  # WAITING_FOR_RESOURCES: end of `qr_wait`; SUSPENDING: when SUSPENDED
    held: bool = False
    failure: dict[str, Any] | None = None  # from fail_next_queued_resource: FAILED instead of PROVISIONING
    not_before: float | None = None  # queueingPolicy validAfter*
    not_after: float | None = None  # queueingPolicy validUntil*

    @property
    def name(self) -> str:
        return self.json["name"]

    @property
    def state(self) -> str:
        return self.json["state"]["state"]


class FakeTpuApi:
    """The fake Cloud TPU API. Use as `with FakeTpuApi(...) as api:` or `start()`/`stop()`.

    Args:
        hosts_for_node: (node id, accelerator type) -> workers (`WorkerHost` dicts) of a new node,
            asked once at create time (for a queued resource: when it starts PROVISIONING); default
            `default_hosts` (one worker at 127.0.0.1).
        on_os_login: called with (posix username, uid, home directory, public key line) when a key
            is imported through the OS Login API (with the server's lock held): how a harness
            models OS Login's NSS module and AuthorizedKeysCommand on the workers.
        on_update: called with a copy of the node JSON when an update of its metadata completes
            (with the server's lock held, like `on_create`): how a harness models the guest agent
            reacting to new `ssh-keys`.
        on_create: called with a copy of the node JSON when a node becomes READY, before its
            create operation reports done (so an sshd harness can install `metadata["ssh-keys"]`
            first), and before a queued resource that made it is ACTIVE. It runs with the server's
            lock held: it must not call this API over HTTP. If it raises, the create operation fails
            with INTERNAL (a queued resource becomes FAILED) and the node is removed.
        op_delay: seconds before an operation completes (create: CREATING -> READY; delete: the
            node disappears); also how long a queued resource's node provisions and how long a
            preempted one is SUSPENDING.
        qr_wait: seconds a queued resource is WAITING_FOR_RESOURCES (from when its create operation
            completes) before it starts PROVISIONING; `hold_queued` keeps one waiting indefinitely.
        zones: what `list_locations` returns (each must look like a zone).
        accelerator_types, runtime_versions: what every zone offers (`offer` changes one zone's).
        host, port: where to listen; port 0 picks a free one.
    """

    def __init__(self, hosts_for_node: HostsForNode | None = None, *,
                 on_create: Callable[[dict[str, Any]], None] | None = None,
                 on_update: Callable[[dict[str, Any]], None] | None = None,
                 on_os_login: Callable[[str, int, str, str], None] | None = None,
                 op_delay: float = 0.3, qr_wait: float = 0.3, zones: Sequence[str] = DEFAULT_ZONES,
                 accelerator_types: Sequence[str] = DEFAULT_ACCELERATOR_TYPES,
                 runtime_versions: Sequence[str] = DEFAULT_RUNTIME_VERSIONS,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        bad = [z for z in zones if not ZONE.match(z)]
        if bad:
            raise ValueError(f"not zones: {bad}")
        self.hosts_for_node: HostsForNode = hosts_for_node or default_hosts
        self.on_create = on_create
        self.on_update = on_update
        self.on_os_login = on_os_login
        self._login_profiles: dict[str, dict[str, Any]] = {}  # account email -> LoginProfile JSON
        self.op_delay = op_delay
        self.qr_wait = qr_wait
        self.zones = list(zones)
        self._offers: dict[str | None, tuple[list[str], list[str]]] = {
            None: (list(accelerator_types), list(runtime_versions))}  # zone (None: any other) -> offer
        self._project_metadata: dict[str, dict[str, str]] = {}
        self.requests: list[RecordedRequest] = []
        self._listen = (host, port)
        self._lock = threading.RLock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._workers: dict[str, list[WorkerHost]] = {}
        self._queued: dict[str, _Queued] = {}
        self._ops: dict[str, _Operation] = {}
        self._failures: list[_Failure] = []
        self._op_failures: list[dict[str, Any]] = []
        self._queued_failures: list[dict[str, Any]] = []
        self._holds: set[str] = set()  # QR names or ids to hold once created
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeTpuApi:
        if self._server is None:
            self._server = _Server(self._listen, _Handler, self)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="fake-tpu-api", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop kept-alive connections, so a stopped API really is gone."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeTpuApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """`http://HOST:PORT`, to pass as `client_options={"api_endpoint": ...}`."""
        if self._server is None:
            raise RuntimeError("FakeTpuApi is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client(self) -> Any:
        """The real `tpu_v2.TpuClient`, configured as the module docstring says."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import tpu_v2

        return tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": self.endpoint})

    # -- test helpers ----------------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        """Live node JSON by full resource name (due operations are completed first)."""
        with self._lock:
            self._advance()
            return self._nodes

    def node(self, name: str) -> dict[str, Any]:
        """One node's live JSON, by full resource name or bare node id (if unique)."""
        with self._lock:
            self._advance()
            return self._nodes[self._resolve(name)]

    def workers(self, name: str) -> list[WorkerHost]:
        """The workers `hosts_for_node` gave a node (full name or bare id)."""
        with self._lock:
            return self._workers[self._resolve(name)]

    def set_state(self, name: str, state: str, health: str | None = None) -> None:
        """Force a node's state (e.g. "PREEMPTED"), as the platform does behind the user's back.
        Preempting the node of an ACTIVE or PROVISIONING queued resource suspends that QR (SUSPENDING,
        then SUSPENDED after `op_delay`, initiator SERVICE), as the platform does to a spot QR."""
        if state not in NODE_ENUMS["state"]:
            raise ValueError(f"unknown Node.State {state!r}")
        with self._lock:
            self._advance()
            node = self._nodes[self._resolve(name)]
            node["state"] = state
            if health is not None:
                node["health"] = health
            q = self._queued.get(node.get("queuedResource", ""))
            if state == "PREEMPTED" and q is not None and q.state in ("ACTIVE", "PROVISIONING"):
                self._set_queued(q, "SUSPENDING", "SERVICE")
                q.timer = time.monotonic() + self.op_delay

    @property
    def queued_resources(self) -> dict[str, dict[str, Any]]:
        """Live queued-resource JSON by full resource name (due steps are taken first)."""
        with self._lock:
            self._advance()
            return {name: q.json for name, q in self._queued.items()}

    def queued_resource(self, name: str) -> dict[str, Any]:
        """One queued resource's live JSON, by full resource name or bare id (if unique)."""
        with self._lock:
            self._advance()
            return self._queued[self._resolve_queued(name)].json

    def hold_queued(self, name: str) -> None:
        """Keep a queued resource WAITING_FOR_RESOURCES (no capacity) until `release_queued`. `name`
        (full name or bare id) may name one not created yet, or one past waiting (a later one of
        that name is then queued): the next one created is held from creation on. Its
        `validUntil*` deadline still fails it."""
        with self._lock:
            self._advance()
            if name not in self._queued and not any(n.rsplit("/", 1)[-1] == name for n in self._queued):
                self._holds.add(name)
                return
            q = self._queued[self._resolve_queued(name)]
            if q.state not in ("ACCEPTED", "WAITING_FOR_RESOURCES"):
                self._holds.add(name)
                return
            q.held = True

    def release_queued(self, name: str) -> None:
        """Capacity for a queued resource (full name or bare id): it provisions now (once
        WAITING_FOR_RESOURCES and past any `validAfter*`), without waiting out `qr_wait`."""
        with self._lock:
            self._holds.discard(name)
            self._advance()
            q = self._queued[self._resolve_queued(name)]
            now = time.monotonic()  # a held QR provisions from now, not from when qr_wait ran out
            q.timer = now if q.held or q.timer is None else min(q.timer, now)
            q.held = False
            self._advance()

    def set_queued_state(self, name: str, state: str, initiator: str | None = None, *,
                         code: int | str | None = None, message: str = "") -> None:
        """Force a queued resource's state, as the platform does behind the user's back; the node is
        left alone (use `set_state` to preempt it). FAILED gets `failedData.error` from `code` and
        `message` when given; WAITING_FOR_RESOURCES waits `qr_wait` again; SUSPENDING becomes
        SUSPENDED after `op_delay`. `initiator` ("USER"/"SERVICE") defaults to SERVICE for FAILED,
        SUSPENDING and SUSPENDED."""
        if state not in QUEUED_STATE_ENUMS["state"]:
            raise ValueError(f"unknown QueuedResourceState.State {state!r}")
        if initiator is not None and initiator not in QUEUED_STATE_ENUMS["stateInitiator"]:
            raise ValueError(f"unknown QueuedResourceState.StateInitiator {initiator!r}")
        with self._lock:
            self._advance()
            q = self._queued[self._resolve_queued(name)]
            if initiator is None and state in ("FAILED", "SUSPENDING", "SUSPENDED"):
                initiator = "SERVICE"
            error = None
            if code is not None:
                error = {"code": RPC_CODES[code] if isinstance(code, str) else int(code), "message": message}
            self._set_queued(q, state, initiator, error)
            now = time.monotonic()
            q.timer = now + self.qr_wait if state == "WAITING_FOR_RESOURCES" else (
                now + self.op_delay if state == "SUSPENDING" else None)

    def fail_next(self, status: int = 403, message: str | None = None, reason: str | None = None, *,
                  method: str | None = None, path: str | None = None, times: int = 1) -> None:
        """Make the next `times` requests (optionally only those with this HTTP `method` and with
        `path` in their URL path) fail with HTTP `status` and Google's error JSON; `reason` is the
        google.rpc status name, derived from `status` when omitted."""
        error = ApiError(status, message or f"injected {status} error", reason)
        with self._lock:
            self._failures.append(_Failure(error, method.upper() if method else None, path, times))

    @property
    def pending_failures(self) -> int:
        """How many injected request failures (`fail_next`) have not been served yet."""
        with self._lock:
            return sum(f.times for f in self._failures)

    def fail_next_operation(self, code: int | str = "RESOURCE_EXHAUSTED",
                            message: str = "There is no more capacity in the zone; try another zone",
                            verb: str | None = None, times: int = 1) -> None:
        """Make the next `times` create/delete operations (of a node or a queued resource; only
        `verb`'s, "create" or "delete", if given) end with this google.rpc error (what it created is
        removed, as after a stockout; what it was deleting is back as it was); the request itself
        still succeeds."""
        code_num = RPC_CODES[code] if isinstance(code, str) else int(code)
        with self._lock:
            self._op_failures.extend({"code": code_num, "message": message, "verb": verb} for _ in range(times))

    def fail_next_queued_resource(self, code: int | str = "RESOURCE_EXHAUSTED",
                                  message: str = "There is no more capacity in the zone; try another zone") -> None:
        """Make the next queued resource created end FAILED instead of PROVISIONING (after its
        `qr_wait`), with `failedData.error` = this google.rpc error and initiator SERVICE, and no node,
        as after a stockout; its create operation still succeeds."""
        code_num = RPC_CODES[code] if isinstance(code, str) else int(code)
        with self._lock:
            self._queued_failures.append({"code": code_num, "message": message})

    def finish_operations(self) -> None:
        """Complete every pending operation now, whatever `op_delay` says, and take every queued
        resource's timed steps (`qr_wait`, provisioning, suspending) until they settle. Held queued
        resources stay held, and queueing-policy times are still obeyed."""
        with self._lock:
            for _ in range(100):  # each round completes what the one before started
                for op in self._ops.values():
                    if not op.done:
                        op.due = 0.0
                for q in self._queued.values():
                    if q.timer is not None and q.state in ("WAITING_FOR_RESOURCES", "SUSPENDING"):
                        q.timer = 0.0
                before = [(name, q.state) for name, q in self._queued.items()]
                self._advance()
                settled = before == [(name, q.state) for name, q in self._queued.items()]
                if settled and all(op.done for op in self._ops.values()):
                    break

    def offer(self, zone: str, types: Sequence[str] | None = None, versions: Sequence[str] | None = None) -> None:
        """What `zone` offers from now on: accelerator types and/or runtime versions (None: as before)."""
        with self._lock:
            old_types, old_versions = self._offers.get(zone, self._offers[None])
            self._offers[zone] = (list(old_types if types is None else types),
                                  list(old_versions if versions is None else versions))

    def project_metadata(self, project: str) -> dict[str, str]:
        """The project's Compute Engine common instance metadata (a copy)."""
        with self._lock:
            return dict(self._project_metadata.get(project, {}))

    def set_project_metadata(self, project: str, key: str, value: str) -> None:
        """One item of the project's Compute Engine common instance metadata, e.g. enable-oslogin=TRUE."""
        with self._lock:
            self._project_metadata.setdefault(project, {})[key] = value

    # -- request handling ------------------------------------------------------------------

    _ROUTES: list[tuple[re.Pattern[str], dict[str, str]]] = [
        (re.compile(r"^/v2/projects/([^/]+)/locations$"), {"GET": "_list_locations"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/:]+)$"), {"GET": "_get_location"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes$"),
         {"GET": "_list_nodes", "POST": "_create_node"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes/([^/:]+):getGuestAttributes$"),
         {"POST": "_get_guest_attributes"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes/([^/:]+)$"),
         {"GET": "_get_node", "DELETE": "_delete_node", "PATCH": "_update_node"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/queuedResources$"),
         {"GET": "_list_queued", "POST": "_create_queued"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/queuedResources/([^/:]+):reset$"),
         {"POST": "_reset_queued"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/queuedResources/([^/:]+)$"),
         {"GET": "_get_queued", "DELETE": "_delete_queued"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/operations/([^/:]+)$"),
         {"GET": "_get_operation"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/acceleratorTypes$"),
         {"GET": "_list_accelerator_types"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/runtimeVersions$"),
         {"GET": "_list_runtime_versions"}),
        (re.compile(r"^/compute/v1/projects/([^/]+)$"), {"GET": "_get_compute_project"}),
        (re.compile(r"^/v1/users/([^/:]+):importSshPublicKey$"), {"POST": "_import_ssh_public_key"}),
        (re.compile(r"^/v1/users/([^/:]+)/loginProfile$"), {"GET": "_get_login_profile"}),
    ]

    def handle(self, method: str, raw_path: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        """One HTTP request -> (status, JSON payload). Public so tests can call it without HTTP."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = parse_qs(url.query, keep_blank_values=True)
        int_enums = "enum-encoding=int" in " ".join(query.get("$alt", []))
        try:
            body = json.loads(raw_body) if raw_body.strip() else {}
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(RecordedRequest(method, path, query, body))
            try:
                self._advance()
                self._maybe_fail(method, path)
                if body is None or not isinstance(body, dict):
                    raise ApiError(400, "Invalid JSON payload received.")
                for pattern, handlers in self._ROUTES:
                    match = pattern.match(path)
                    if match:
                        break
                else:
                    raise ApiError(404, f"The requested URL {path} was not found on this server.")
                if method not in handlers:
                    raise ApiError(405, f"Method {method} is not allowed for {path}.")
                if len(match.groups()) >= 2:
                    project, zone = match.group(1), match.group(2)
                    if not ZONE.match(zone):
                        raise ApiError(400, f"Invalid location: projects/{project}/locations/{zone}")
                return 200, getattr(self, handlers[method])(*match.groups(), query=query, body=body,
                                                            int_enums=int_enums)
            except ApiError as e:
                return e.http_status, e.payload()
            except Exception as e:  # a bug here or in hosts_for_node: report it, don't hang the client
                return 500, ApiError(500, f"fake TPU API error: {e!r}").payload()

    def _maybe_fail(self, method: str, path: str) -> None:
        for failure in self._failures:
            if (failure.method in (None, method)) and (failure.path is None or failure.path in path):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                raise failure.error

    def _list_locations(self, project: str, **_: Any) -> dict[str, Any]:
        return {"locations": [self._location(project, z) for z in self.zones]}

    def _get_location(self, project: str, zone: str, **_: Any) -> dict[str, Any]:
        if zone not in self.zones:
            raise ApiError(404, f"Location 'projects/{project}/locations/{zone}' was not found")
        return self._location(project, zone)

    @staticmethod
    def _location(project: str, zone: str) -> dict[str, Any]:
        return {"name": f"projects/{project}/locations/{zone}", "locationId": zone}

    def _list_accelerator_types(self, project: str, zone: str, **_: Any) -> dict[str, Any]:
        types = self._offers.get(zone, self._offers[None])[0]
        return {"acceleratorTypes": [{"name": f"projects/{project}/locations/{zone}/acceleratorTypes/{t}", "type": t}
                                     for t in types]}

    def _list_runtime_versions(self, project: str, zone: str, **_: Any) -> dict[str, Any]:
        versions = self._offers.get(zone, self._offers[None])[1]
        return {"runtimeVersions": [{"name": f"projects/{project}/locations/{zone}/runtimeVersions/{v}", "version": v}
                                    for v in versions]}

    def login_profile(self, email: str) -> dict[str, Any] | None:
        """An account's OS Login profile (a copy), None before any key was imported."""
        with self._lock:
            return copy.deepcopy(self._login_profiles.get(email))

    def _import_ssh_public_key(self, email: str, *, query: dict[str, list[str]], body: dict[str, Any],
                               **_: Any) -> dict[str, Any]:
        if not re.match(r"^[^@\s]+@[^@\s]+\.[a-z]+$", email):
            raise ApiError(400, f"Invalid value at 'parent' (users/{email}): expected users/{{email}}")
        key = str(body.get("key") or "").strip()
        if len(key.split()) < 2 or not key.startswith("ssh-"):
            raise ApiError(400, "Invalid value for field 'ssh_public_key.key': not an OpenSSH public key")
        project = (query.get("projectId") or [""])[0]
        profile = self._login_profiles.get(email)
        if profile is None:
            username = re.sub(r"[^a-z0-9]", "_", email.lower())[:32]
            uid = 2000 + len(self._login_profiles)
            profile = {"name": email, "posixAccounts": [{
                "primary": True, "username": username, "uid": str(uid), "gid": str(uid),
                "homeDirectory": f"/home/{username}", "shell": "/bin/sh", "accountId": project,
                "operatingSystemType": "LINUX", "name": f"users/{email}/projects/{project}"}], "sshPublicKeys": {}}
            self._login_profiles[email] = profile
        fingerprint = hashlib.sha256(key.split()[1].encode()).hexdigest()
        profile["sshPublicKeys"][fingerprint] = {"key": key, "fingerprint": fingerprint,
                                                 "name": f"users/{email}/sshPublicKeys/{fingerprint}"}
        account = profile["posixAccounts"][0]
        if self.on_os_login is not None:
            self.on_os_login(account["username"], int(account["uid"]), account["homeDirectory"], key)
        return {"loginProfile": copy.deepcopy(profile)}

    def _get_login_profile(self, email: str, **_: Any) -> dict[str, Any]:
        if email not in self._login_profiles:
            raise ApiError(404, f"User users/{email} has no login profile")
        return copy.deepcopy(self._login_profiles[email])

    def _get_compute_project(self, project: str, **_: Any) -> dict[str, Any]:
        items = [{"key": k, "value": v} for k, v in self._project_metadata.get(project, {}).items()]
        return {"kind": "compute#project", "name": project,
                "commonInstanceMetadata": {"kind": "compute#metadata", **({"items": items} if items else {})}}

    def _list_nodes(self, project: str, zone: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        parent = f"projects/{project}/locations/{zone}/nodes/"
        return {"nodes": [self._node_out(n, int_enums) for name, n in sorted(self._nodes.items())
                          if name.startswith(parent)]}

    def _get_node(self, project: str, zone: str, node_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        return self._node_out(self._nodes[self._require(project, zone, node_id)], int_enums)

    def _create_node(self, project: str, zone: str, *, query: dict[str, list[str]], body: dict[str, Any],
                     int_enums: bool) -> dict[str, Any]:
        node_id = (query.get("nodeId") or [""])[0]
        self._check_node(zone, node_id, body, "node")
        name = f"projects/{project}/locations/{zone}/nodes/{node_id}"
        if name in self._nodes:
            raise ApiError(409, f"Resource '{name}' already exists")
        self._add_node(name, body)
        return self._op_out(self._new_operation("create", name), int_enums)

    def _update_node(self, project: str, zone: str, node_id: str, *, query: dict[str, list[str]], body: dict[str, Any],
                     int_enums: bool) -> dict[str, Any]:
        name = self._require(project, zone, node_id)
        mask = [p for m in query.get("updateMask", []) for p in m.split(",") if p]
        if mask != ["metadata"]:
            raise ApiError(400, f"fake TPU API: only updateMask=metadata is modelled, got {mask!r}")
        if self._nodes[name].get("state") not in ("READY", "STOPPED", "PREEMPTED", "TERMINATED"):
            raise ApiError(400, f"Node {name} is {self._nodes[name].get('state')}: it cannot be updated now",
                           "FAILED_PRECONDITION")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ApiError(400, "Invalid value for field 'node.metadata': expected a map of strings")
        op = self._new_operation("update", name)
        op.patch = {"metadata": dict(metadata)}
        return self._op_out(op, int_enums)

    def _delete_node(self, project: str, zone: str, node_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        name = self._require(project, zone, node_id)
        node = self._nodes[name]
        op = self._new_operation("delete", name)
        op.prior_state = node.get("state")
        node["state"] = "DELETING"
        q = self._queued.get(node.get("queuedResource", ""))
        if q is not None:  # the user takes the QR's node away: the QR is suspended by the user
            op.queued = q.name
            if q.state in ("ACTIVE", "PROVISIONING"):
                op.prior_queued = copy.deepcopy(q.json["state"])
                self._set_queued(q, "SUSPENDING", "USER")
                q.timer = None  # SUSPENDED when this operation has removed the node
        return self._op_out(op, int_enums)

    def _get_guest_attributes(self, project: str, zone: str, node_id: str, *, body: dict[str, Any],
                              **_: Any) -> dict[str, Any]:
        name = self._require(project, zone, node_id)
        workers = self._workers[name]
        query_path = body.get("queryPath", "")
        namespace, _sep, key = query_path.partition("/")
        indices: list[int] = []
        for worker_id in body.get("workerIds") or [str(i) for i in range(len(workers))]:
            if not str(worker_id).isdigit() or int(worker_id) >= len(workers):
                raise ApiError(400, f"Invalid worker id {worker_id!r}: the node has {len(workers)} workers")
            if int(worker_id) not in indices:
                indices.append(int(worker_id))
        booted = self._nodes[name].get("state") not in ("CREATING", None)
        attributes = []
        for i in indices:
            items = [{"namespace": "hostkeys", "key": kind, "value": _key_base64(line)}
                     for kind, line in (workers[i].get("host_keys") or {}).items()] if booted else []
            items = [it for it in items if (not namespace or it["namespace"] == namespace)
                     and (not key or it["key"] == key)]
            attributes.append({"queryPath": query_path, "queryValue": {"items": items}})
        return {"guestAttributes": attributes}

    def _list_queued(self, project: str, zone: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        parent = f"projects/{project}/locations/{zone}/queuedResources/"
        return {"queuedResources": [self._queued_out(q.json, int_enums) for name, q in sorted(self._queued.items())
                                    if name.startswith(parent)]}

    def _get_queued(self, project: str, zone: str, qr_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        return self._queued_out(self._queued[self._require_queued(project, zone, qr_id)].json, int_enums)

    def _create_queued(self, project: str, zone: str, *, query: dict[str, list[str]], body: dict[str, Any],
                       int_enums: bool) -> dict[str, Any]:
        parent = f"projects/{project}/locations/{zone}"
        qr_id = (query.get("queuedResourceId") or [""])[0]
        if not NODE_ID.match(qr_id):
            raise ApiError(400, f"Invalid queued resource id {qr_id!r}: lowercase letters, digits and '-', "
                                "starting with a letter, at most 63 characters")
        specs = (body.get("tpu") or {}).get("nodeSpec") or []
        if not specs:
            raise ApiError(400, "Invalid value for field 'queued_resource.tpu.node_spec': at least one is required")
        if len(specs) > 1 or any("multisliceParams" in s for s in specs):
            raise ApiError(501, "fake TPU API: multislice queued resources (several node specs or "
                                "multisliceParams) are not implemented")
        spec = specs[0]
        if spec.get("parent") != parent:
            raise ApiError(400, f"Invalid value for field 'queued_resource.tpu.node_spec[0].parent': "
                                f"{spec.get('parent')!r} must be {parent!r}")
        self._check_node(zone, spec.get("nodeId", ""), spec.get("node") or {},
                         "queued_resource.tpu.node_spec[0].node")
        if "spot" in body and "guaranteed" in body:
            raise ApiError(400, "Invalid JSON payload received. Multiple values for oneof 'tier': "
                                "'spot' and 'guaranteed'")
        reservation = body.get("reservationName")
        if reservation and not RESERVATION.match(reservation):
            raise ApiError(400, f"Invalid value for field 'queued_resource.reservation_name': {reservation!r}, "
                                "expected projects/{project}/locations/{zone}/reservations/{reservation}")
        created = datetime.now(timezone.utc)
        policy, not_before, not_after = self._queueing_policy(body.get("queueingPolicy"), created)
        name = f"{parent}/queuedResources/{qr_id}"
        node_name = f"{parent}/nodes/{spec['nodeId']}"
        if name in self._queued:
            raise ApiError(409, f"Resource '{name}' already exists")
        if node_name in self._nodes or any(q.node_name == node_name and q.state in QUEUED_CLAIMING
                                           for q in self._queued.values()):
            raise ApiError(409, f"Resource '{node_name}' already exists")
        qr = {k: copy.deepcopy(v) for k, v in body.items() if k not in QUEUED_OUTPUT_ONLY}
        qr["tpu"]["nodeSpec"][0]["node"] = {k: v for k, v in (spec.get("node") or {}).items()
                                            if k not in OUTPUT_ONLY}
        if policy is not None:
            qr["queueingPolicy"] = policy
        qr.update(name=name, createTime=rfc3339(created), state={})
        q = _Queued(qr, node_name, not_before=not_before, not_after=not_after,
                    failure=self._queued_failures.pop(0) if self._queued_failures else None)
        if {name, qr_id} & self._holds:
            q.held = True
            self._holds -= {name, qr_id}
        self._set_queued(q, "ACCEPTED")
        self._queued[name] = q
        return self._op_out(self._new_operation("create", name), int_enums)

    def _delete_queued(self, project: str, zone: str, qr_id: str, *, query: dict[str, list[str]],
                       int_enums: bool, **_: Any) -> dict[str, Any]:
        name = self._require_queued(project, zone, qr_id)
        q = self._queued[name]
        force = (query.get("force") or ["false"])[0].lower() == "true"
        if q.state == "DELETING" or (not force and q.state not in QUEUED_DELETABLE):
            raise ApiError(400, f"DeleteQueuedResource is not supported when state is {q.state} "
                                f"(must be one of [{' '.join(QUEUED_DELETABLE)}])", "FAILED_PRECONDITION")
        op = self._new_operation("delete", name)
        op.force, op.prior_queued = force, copy.deepcopy(q.json["state"])
        node = self._nodes.get(q.node_name)
        if force and node is not None and node.get("queuedResource") == name:
            op.prior_state = node.get("state")
            node["state"] = "DELETING"
        self._set_queued(q, "DELETING")
        return self._op_out(op, int_enums)

    def _reset_queued(self, *_: Any, **__: Any) -> dict[str, Any]:
        raise ApiError(501, "fake TPU API: queuedResources.reset is not implemented")

    def _get_operation(self, project: str, zone: str, op_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        name = f"projects/{project}/locations/{zone}/operations/{op_id}"
        if name not in self._ops:
            raise ApiError(404, f"Operation '{name}' was not found")
        return self._op_out(self._ops[name], int_enums)

    # -- validation ------------------------------------------------------------------------

    @staticmethod
    def _check_node(zone: str, node_id: str, body: dict[str, Any], field: str) -> None:
        """What Google checks of a node to create, by nodes.create or through a queued resource."""
        if not NODE_ID.match(node_id):
            raise ApiError(400, f"Invalid node id {node_id!r}: lowercase letters, digits and '-', "
                                "starting with a letter, at most 63 characters")
        accelerator_type = body.get("acceleratorType", "")
        if not ACCELERATOR_TYPE.match(accelerator_type):
            raise ApiError(400, f"Invalid accelerator type {accelerator_type!r} in {zone}")
        if not body.get("runtimeVersion"):
            raise ApiError(400, f"Invalid value for field '{field}.runtime_version': it is required")

    @staticmethod
    def _queueing_policy(policy: dict[str, Any] | None, created: datetime
                         ) -> tuple[dict[str, Any] | None, float | None, float | None]:
        """The policy as Google returns it (relative durations become times) and its monotonic
        (not before, not after) bounds."""
        if not policy:
            return policy, None, None
        given = [f for f in QUEUEING_POLICY_FIELDS if f in policy]
        if len(given) > 1:
            raise ApiError(400, "Invalid JSON payload received. Multiple values for oneof "
                                f"'start_timing_constraints': {', '.join(given)}")
        out = copy.deepcopy(policy)
        now_mono = time.monotonic()

        def parse_time(field: str, value: Any) -> float:
            try:
                when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                raise ApiError(400, f"Invalid value for field 'queueing_policy.{field}': {value!r}") from None
            return now_mono + (when - created).total_seconds()

        for kind in ("Until", "After"):
            duration = out.pop(f"valid{kind}Duration", None)
            if duration is not None:
                match = DURATION.match(str(duration))
                if not match:
                    raise ApiError(400, f"Invalid value for field 'queueing_policy.valid_{kind.lower()}_duration': "
                                        f"{duration!r}")
                out[f"valid{kind}Time"] = rfc3339(created + timedelta(seconds=float(match.group(1))))
        not_before = parse_time("valid_after_time", out["validAfterTime"]) if "validAfterTime" in out else None
        not_after = parse_time("valid_until_time", out["validUntilTime"]) if "validUntilTime" in out else None
        interval = out.get("validInterval") or {}
        if "startTime" in interval:
            not_before = parse_time("valid_interval.start_time", interval["startTime"])
        if "endTime" in interval:
            not_after = parse_time("valid_interval.end_time", interval["endTime"])
        return out, not_before, not_after

    # -- state -----------------------------------------------------------------------------

    def _require(self, project: str, zone: str, node_id: str) -> str:
        name = f"projects/{project}/locations/{zone}/nodes/{node_id}"
        if name not in self._nodes:
            raise ApiError(404, f"Resource '{name}' was not found")
        return name

    def _require_queued(self, project: str, zone: str, qr_id: str) -> str:
        name = f"projects/{project}/locations/{zone}/queuedResources/{qr_id}"
        if name not in self._queued:
            raise ApiError(404, f"Resource '{name}' was not found")
        return name

    def _resolve(self, name: str) -> str:
        return _resolve_in(self._nodes, name, "node")

    def _resolve_queued(self, name: str) -> str:
        return _resolve_in(self._queued, name, "queued resource")

    def _add_node(self, name: str, body: dict[str, Any], **output: Any) -> dict[str, Any]:
        """A new CREATING node from a create body (output-only fields dropped, `output` added)."""
        workers = list(self.hosts_for_node(name.rsplit("/", 1)[-1], body.get("acceleratorType", "")))
        node = {k: copy.deepcopy(v) for k, v in body.items() if k not in OUTPUT_ONLY}
        node.update(name=name, state="CREATING", createTime=now_rfc3339(),
                    id=str(10**18 + secrets.randbelow(8 * 10**18)), apiVersion="V2", **output)  # id is an int64
        self._nodes[name] = node
        self._workers[name] = workers
        return node

    def _new_operation(self, verb: str, target: str, *, start: float | None = None,
                       internal: bool = False) -> _Operation:
        """An operation on `target`, due `op_delay` after `start` (now). An internal one (the
        service's own, e.g. a QR provisioning its node) takes no `fail_next_operation` error."""
        location = target.split("/nodes/")[0].split("/queuedResources/")[0]
        op_id = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        planned = None if internal else next((f for f in self._op_failures if f["verb"] in (None, verb)), None)
        if planned is not None:
            self._op_failures.remove(planned)
        op = _Operation(name=f"{location}/operations/{op_id}", verb=verb, target=target,
                        due=(time.monotonic() if start is None else start) + self.op_delay,
                        create_time=now_rfc3339(),
                        planned_error={k: planned[k] for k in ("code", "message")} if planned else None)
        self._ops[op.name] = op
        return op

    def _set_queued(self, q: _Queued, state: str, initiator: str | None = None,
                    error: dict[str, Any] | None = None) -> None:
        out: dict[str, Any] = {"state": state}
        if state in QUEUED_STATE_DATA:
            out[QUEUED_STATE_DATA[state]] = {"error": error} if error is not None else {}
        if initiator is not None:
            out["stateInitiator"] = initiator
        q.json["state"] = out

    def _fail_queued(self, q: _Queued, code: str | int, message: str) -> None:
        code_num = RPC_CODES[code] if isinstance(code, str) else code
        self._set_queued(q, "FAILED", "SERVICE", {"code": code_num, "message": message})
        q.timer = None

    def _advance(self) -> None:
        """Complete the operations and take the queued-resource steps that are due, in time order.
        Done lazily, on each request and helper call, so no timer thread races the tests and a
        hook always runs before a client can see `done`. Each step is timed from when the one
        before it was due, not from when it was noticed."""
        while True:
            now = time.monotonic()
            due: list[tuple[float, int, Any]] = [(op.due, 0, op) for op in self._ops.values()
                                                 if not op.done and op.due <= now]
            for q in self._queued.values():
                when = self._queued_due(q)
                if when is not None and when <= now:
                    due.append((when, 1, q))
            if not due:
                return
            at, kind, item = min(due, key=lambda d: d[:2])
            if kind == 0:
                self._finish(item)
            else:
                self._step_queued(item, at)

    @staticmethod
    def _queued_ready(q: _Queued) -> float | None:
        """When a waiting QR gets its capacity: never while held, and not before `validAfter*`."""
        return None if q.held or q.timer is None else max(q.timer, q.not_before or q.timer)

    def _queued_due(self, q: _Queued) -> float | None:
        """When a QR's next timed step is due (a waiting one's deadline counts even while held)."""
        if q.state == "SUSPENDING":
            return q.timer
        if q.state != "WAITING_FOR_RESOURCES":
            return None
        times = [t for t in (self._queued_ready(q), q.not_after) if t is not None]
        return min(times) if times else None

    def _step_queued(self, q: _Queued, at: float) -> None:
        if q.state == "SUSPENDING":
            self._set_queued(q, "SUSPENDED", q.json["state"].get("stateInitiator", "SERVICE"))
            q.timer = None
            return
        ready = self._queued_ready(q)
        if ready is None or ready > at:  # the validUntil deadline came first
            self._fail_queued(q, "DEADLINE_EXCEEDED",
                              f"{q.name} could not be provisioned before its queueing policy's deadline")
        elif q.failure is not None:
            self._fail_queued(q, q.failure["code"], q.failure["message"])
        elif q.node_name in self._nodes:
            self._fail_queued(q, "ALREADY_EXISTS", f"Resource '{q.node_name}' already exists")
        else:
            body = copy.deepcopy(q.json["tpu"]["nodeSpec"][0]["node"])
            if "spot" in q.json:
                body["schedulingConfig"] = {**(body.get("schedulingConfig") or {}), "spot": True}
            try:
                self._add_node(q.node_name, body, queuedResource=q.name)
            except Exception as e:  # hosts_for_node failed: the service could not provision
                self._fail_queued(q, "INTERNAL", f"fake TPU API error: {e!r}")
                return
            self._set_queued(q, "PROVISIONING")
            q.timer = None
            self._new_operation("create", q.node_name, start=at, internal=True).queued = q.name

    def _finish(self, op: _Operation) -> None:
        op.done, op.end_time = True, now_rfc3339()
        if "/queuedResources/" in op.target:
            self._finish_queued_op(op)
            return
        self._finish_node_op(op)
        if op.queued is not None:
            self._node_op_done(op)

    def _finish_node_op(self, op: _Operation) -> None:
        node = self._nodes.get(op.target)
        if op.planned_error is not None:
            op.error = op.planned_error
            if op.verb == "create":
                self._drop(op.target)
            elif node is not None and op.verb == "delete":
                node["state"] = op.prior_state or "READY"
            return
        if op.verb == "delete":
            self._drop(op.target)
            return
        if op.verb == "update" and node is not None:
            node.update(copy.deepcopy(op.patch or {}))
            if self.on_update is not None:
                self.on_update(copy.deepcopy(node))
            op.snapshot = copy.deepcopy(node)
            return
        if node is None:
            op.error = {"code": RPC_CODES["ABORTED"], "message": f"{op.target} was deleted while being created"}
            return
        if node.get("state") == "CREATING":
            external = bool((node.get("networkConfig") or {}).get("enableExternalIps"))
            node["networkEndpoints"] = [
                {"ipAddress": w.get("internal_ip") or w["ip"], "port": WORKER_PORT,
                 **({"accessConfig": {"externalIp": w["ip"]}} if external else {})}
                for w in self._workers.get(op.target, [])]
            node["state"], node["health"] = "READY", "HEALTHY"
            if self.on_create is not None:
                try:
                    self.on_create(copy.deepcopy(node))
                except Exception as e:
                    op.error = {"code": RPC_CODES["INTERNAL"], "message": f"on_create hook failed: {e!r}"}
                    self._drop(op.target)
                    return
        op.snapshot = copy.deepcopy(node)

    def _node_op_done(self, op: _Operation) -> None:
        """What a finished operation on a QR's node means for the QR."""
        q = self._queued.get(op.queued or "")
        if q is None:
            return
        if op.verb == "create" and q.state == "PROVISIONING":
            if op.error is not None:
                self._fail_queued(q, op.error["code"], op.error["message"])
            else:
                self._set_queued(q, "ACTIVE")
        elif op.verb == "delete" and q.state == "SUSPENDING":
            if op.error is not None and op.prior_queued is not None:
                q.json["state"] = op.prior_queued
            elif op.error is None:
                self._set_queued(q, "SUSPENDED", q.json["state"].get("stateInitiator", "USER"))

    def _finish_queued_op(self, op: _Operation) -> None:
        q = self._queued.get(op.target)
        if op.verb == "create":
            if op.planned_error is not None:
                op.error = op.planned_error
                self._queued.pop(op.target, None)
            elif q is None:
                op.error = {"code": RPC_CODES["ABORTED"], "message": f"{op.target} was deleted while being created"}
            else:
                if q.state == "ACCEPTED":  # persisted in the queue (a release_queued came early: no wait)
                    self._set_queued(q, "WAITING_FOR_RESOURCES")
                    q.timer = op.due + self.qr_wait if q.timer is None else max(q.timer, op.due)
                op.snapshot = copy.deepcopy(q.json)
            return
        if q is None:  # its create operation failed meanwhile: nothing left to delete
            return
        node = self._nodes.get(q.node_name)
        owned = node if node is not None and node.get("queuedResource") == q.name else None
        if op.planned_error is not None:
            op.error = op.planned_error
            if op.prior_queued is not None:
                q.json["state"] = op.prior_queued
            if op.force and owned is not None and op.prior_state is not None:
                owned["state"] = op.prior_state
            return
        del self._queued[q.name]
        if op.force and owned is not None:
            self._drop(q.node_name)

    def _drop(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._workers.pop(name, None)

    # -- JSON out --------------------------------------------------------------------------

    @staticmethod
    def _node_out(node: dict[str, Any], int_enums: bool) -> dict[str, Any]:
        out = copy.deepcopy(node)
        if int_enums:
            for field, values in NODE_ENUMS.items():
                if isinstance(out.get(field), str):
                    out[field] = values[out[field]]
        return out

    @staticmethod
    def _queued_out(qr: dict[str, Any], int_enums: bool) -> dict[str, Any]:
        out = copy.deepcopy(qr)
        if int_enums:
            state = out.get("state") or {}
            for field, values in QUEUED_STATE_ENUMS.items():
                if isinstance(state.get(field), str):
                    state[field] = values[state[field]]
        return out

    def _op_out(self, op: _Operation, int_enums: bool) -> dict[str, Any]:
        metadata = {"@type": METADATA_TYPE_URL, "createTime": op.create_time, "target": op.target,
                    "verb": op.verb, "cancelRequested": False, "apiVersion": "v2"}
        if op.end_time:
            metadata["endTime"] = op.end_time
        out: dict[str, Any] = {"name": op.name, "metadata": metadata, "done": op.done}
        if op.done and op.error is not None:
            out["error"] = op.error
        elif op.done and op.verb == "create" and "/queuedResources/" in op.target:
            out["response"] = {"@type": QUEUED_RESOURCE_TYPE_URL, **self._queued_out(op.snapshot or {}, int_enums)}
        elif op.done and op.verb in ("create", "update"):
            out["response"] = {"@type": NODE_TYPE_URL, **self._node_out(op.snapshot or {}, int_enums)}
        elif op.done:
            out["response"] = {"@type": EMPTY_TYPE_URL}
        return out


def _resolve_in(resources: dict[str, Any], name: str, kind: str) -> str:
    """A full resource name, from itself or a bare id that names exactly one resource."""
    if name in resources:
        return name
    matches = [n for n in resources if n.rsplit("/", 1)[-1] == name]
    if len(matches) != 1:
        raise KeyError(f"{name!r}: {f'no such {kind}' if not matches else 'ambiguous: ' + ', '.join(matches)}")
    return matches[0]


def _key_base64(line: str) -> str:
    """The base64 part of an OpenSSH public key line, which is what the guest agent publishes."""
    parts = line.split()
    return parts[1] if len(parts) >= 2 else line.strip()


class _Server(ThreadingHTTPServer):
    """Tracks open connections so `stop()` can close kept-alive ones (HTTP/1.1 handler threads
    would otherwise keep serving a client's pooled connection after shutdown)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: FakeTpuApi) -> None:
        self.api = api
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle kept-alive connection's thread ends after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, payload = self.server.api.handle(self.command, self.path, raw)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _dispatch
