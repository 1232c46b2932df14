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
- `DELETE /v2/projects/{p}/locations/{z}/nodes/{id}`        delete -> Operation
- `POST   /v2/projects/{p}/locations/{z}/nodes/{id}:getGuestAttributes` -> {"guestAttributes": [...]}
- `GET    /v2/projects/{p}/locations/{z}/operations/{op}`   poll an Operation

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
  (which the generated REST client always sends); both parse.
- `accessConfig.externalIp` is set only when the create body has `networkConfig.enableExternalIps`
  (as on Google); `ipAddress` is the worker's `internal_ip`, defaulting to its `ip`.
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
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, TypedDict
from urllib.parse import parse_qs, unquote, urlsplit

ACCELERATOR_TYPE = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-\d+$")
ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
NODE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

NODE_TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2.Node"
METADATA_TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
EMPTY_TYPE_URL = "type.googleapis.com/google.protobuf.Empty"
WORKER_PORT = 8470

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
# Fields the API computes; whatever a create body says about them is ignored, as on Google.
OUTPUT_ONLY = ("name", "state", "healthDescription", "createTime", "networkEndpoints", "health",
               "id", "apiVersion", "symptoms", "queuedResource", "multisliceNode")


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


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
    verb: str  # "create" | "delete"
    target: str  # the node's full resource name
    due: float  # time.monotonic() at which it completes
    create_time: str
    planned_error: dict[str, Any] | None = None
    prior_state: str | None = None
    done: bool = False
    end_time: str | None = None
    error: dict[str, Any] | None = None
    node: dict[str, Any] | None = None  # create: the node as it was when the operation finished


class FakeTpuApi:
    """The fake Cloud TPU API. Use as `with FakeTpuApi(...) as api:` or `start()`/`stop()`.

    Args:
        hosts_for_node: (node id, accelerator type) -> workers (`WorkerHost` dicts) of a new node,
            asked once at create time; default `default_hosts` (one worker at 127.0.0.1).
        on_create: called with a copy of the node JSON when a node becomes READY, before its
            create operation reports done (so an sshd harness can install `metadata["ssh-keys"]`
            first). It runs with the server's lock held: it must not call this API over HTTP. If it
            raises, the create operation fails with INTERNAL and the node is removed.
        op_delay: seconds before an operation completes (create: CREATING -> READY; delete: the
            node disappears).
        host, port: where to listen; port 0 picks a free one.
    """

    def __init__(self, hosts_for_node: HostsForNode | None = None, *,
                 on_create: Callable[[dict[str, Any]], None] | None = None,
                 op_delay: float = 0.3, host: str = "127.0.0.1", port: int = 0) -> None:
        self.hosts_for_node: HostsForNode = hosts_for_node or default_hosts
        self.on_create = on_create
        self.op_delay = op_delay
        self.requests: list[RecordedRequest] = []
        self._listen = (host, port)
        self._lock = threading.RLock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._workers: dict[str, list[WorkerHost]] = {}
        self._ops: dict[str, _Operation] = {}
        self._failures: list[_Failure] = []
        self._op_failures: list[dict[str, Any]] = []
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
        """Force a node's state (e.g. "PREEMPTED"), as the platform does behind the user's back."""
        if state not in NODE_ENUMS["state"]:
            raise ValueError(f"unknown Node.State {state!r}")
        with self._lock:
            self._advance()
            node = self._nodes[self._resolve(name)]
            node["state"] = state
            if health is not None:
                node["health"] = health

    def fail_next(self, status: int = 403, message: str | None = None, reason: str | None = None, *,
                  method: str | None = None, path: str | None = None, times: int = 1) -> None:
        """Make the next `times` requests (optionally only those with this HTTP `method` and with
        `path` in their URL path) fail with HTTP `status` and Google's error JSON; `reason` is the
        google.rpc status name, derived from `status` when omitted."""
        error = ApiError(status, message or f"injected {status} error", reason)
        with self._lock:
            self._failures.append(_Failure(error, method.upper() if method else None, path, times))

    def fail_next_operation(self, code: int | str = "RESOURCE_EXHAUSTED",
                            message: str = "There is no more capacity in the zone; try another zone") -> None:
        """Make the next create/delete operation end with this google.rpc error (a create's node is
        removed, as after a stockout); the request itself still succeeds."""
        code_num = RPC_CODES[code] if isinstance(code, str) else int(code)
        with self._lock:
            self._op_failures.append({"code": code_num, "message": message})

    def finish_operations(self) -> None:
        """Complete every pending operation now, whatever `op_delay` says."""
        with self._lock:
            for op in self._ops.values():
                if not op.done:
                    op.due = 0.0
            self._advance()

    # -- request handling ------------------------------------------------------------------

    _ROUTES: list[tuple[re.Pattern[str], dict[str, str]]] = [
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes$"),
         {"GET": "_list_nodes", "POST": "_create_node"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes/([^/:]+):getGuestAttributes$"),
         {"POST": "_get_guest_attributes"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes/([^/:]+)$"),
         {"GET": "_get_node", "DELETE": "_delete_node"}),
        (re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/operations/([^/:]+)$"),
         {"GET": "_get_operation"}),
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

    def _list_nodes(self, project: str, zone: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        parent = f"projects/{project}/locations/{zone}/nodes/"
        return {"nodes": [self._node_out(n, int_enums) for name, n in sorted(self._nodes.items())
                          if name.startswith(parent)]}

    def _get_node(self, project: str, zone: str, node_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        return self._node_out(self._nodes[self._require(project, zone, node_id)], int_enums)

    def _create_node(self, project: str, zone: str, *, query: dict[str, list[str]], body: dict[str, Any],
                     int_enums: bool) -> dict[str, Any]:
        node_id = (query.get("nodeId") or [""])[0]
        if not NODE_ID.match(node_id):
            raise ApiError(400, f"Invalid node id {node_id!r}: lowercase letters, digits and '-', "
                                "starting with a letter, at most 63 characters")
        accelerator_type = body.get("acceleratorType", "")
        if not ACCELERATOR_TYPE.match(accelerator_type):
            raise ApiError(400, f"Invalid accelerator type {accelerator_type!r} in {zone}")
        if not body.get("runtimeVersion"):
            raise ApiError(400, "Invalid value for field 'node.runtime_version': it is required")
        name = f"projects/{project}/locations/{zone}/nodes/{node_id}"
        if name in self._nodes:
            raise ApiError(409, f"Resource '{name}' already exists")
        workers = list(self.hosts_for_node(node_id, accelerator_type))
        node = {k: copy.deepcopy(v) for k, v in body.items() if k not in OUTPUT_ONLY}
        node.update(name=name, state="CREATING", createTime=now_rfc3339(),
                    id=str(10**18 + secrets.randbelow(8 * 10**18)), apiVersion="V2")  # id is an int64
        self._nodes[name] = node
        self._workers[name] = workers
        return self._op_out(self._new_operation("create", project, zone, name), int_enums)

    def _delete_node(self, project: str, zone: str, node_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        name = self._require(project, zone, node_id)
        node = self._nodes[name]
        op = self._new_operation("delete", project, zone, name)
        op.prior_state = node.get("state")
        node["state"] = "DELETING"
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

    def _get_operation(self, project: str, zone: str, op_id: str, *, int_enums: bool, **_: Any) -> dict[str, Any]:
        name = f"projects/{project}/locations/{zone}/operations/{op_id}"
        if name not in self._ops:
            raise ApiError(404, f"Operation '{name}' was not found")
        return self._op_out(self._ops[name], int_enums)

    # -- state -----------------------------------------------------------------------------

    def _require(self, project: str, zone: str, node_id: str) -> str:
        name = f"projects/{project}/locations/{zone}/nodes/{node_id}"
        if name not in self._nodes:
            raise ApiError(404, f"Resource '{name}' was not found")
        return name

    def _resolve(self, name: str) -> str:
        if name in self._nodes:
            return name
        matches = [n for n in self._nodes if n.rsplit("/", 1)[-1] == name]
        if len(matches) != 1:
            raise KeyError(f"{name!r}: {'no such node' if not matches else 'ambiguous: ' + ', '.join(matches)}")
        return matches[0]

    def _new_operation(self, verb: str, project: str, zone: str, target: str) -> _Operation:
        op_id = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        op = _Operation(name=f"projects/{project}/locations/{zone}/operations/{op_id}", verb=verb, target=target,
                        due=time.monotonic() + self.op_delay, create_time=now_rfc3339(),
                        planned_error=self._op_failures.pop(0) if self._op_failures else None)
        self._ops[op.name] = op
        return op

    def _advance(self) -> None:
        """Complete the operations that are due. Done lazily, on each request and helper call, so
        no timer thread races the tests and a hook always runs before a client can see `done`."""
        now = time.monotonic()
        for op in sorted((o for o in self._ops.values() if not o.done and o.due <= now), key=lambda o: o.due):
            self._finish(op)

    def _finish(self, op: _Operation) -> None:
        op.done, op.end_time = True, now_rfc3339()
        node = self._nodes.get(op.target)
        if op.planned_error is not None:
            op.error = op.planned_error
            if op.verb == "create":
                self._drop(op.target)
            elif node is not None:
                node["state"] = op.prior_state or "READY"
            return
        if op.verb == "delete":
            self._drop(op.target)
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
        op.node = copy.deepcopy(node)

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

    def _op_out(self, op: _Operation, int_enums: bool) -> dict[str, Any]:
        metadata = {"@type": METADATA_TYPE_URL, "createTime": op.create_time, "target": op.target,
                    "verb": op.verb, "cancelRequested": False, "apiVersion": "v2"}
        if op.end_time:
            metadata["endTime"] = op.end_time
        out: dict[str, Any] = {"name": op.name, "metadata": metadata, "done": op.done}
        if op.done and op.error is not None:
            out["error"] = op.error
        elif op.done and op.verb == "create":
            out["response"] = {"@type": NODE_TYPE_URL, **self._node_out(op.node or {}, int_enums)}
        elif op.done:
            out["response"] = {"@type": EMPTY_TYPE_URL}
        return out


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
