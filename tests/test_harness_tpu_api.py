"""The fake Cloud TPU API speaks the protocol the real `google-cloud-tpu` REST client expects.

Why: launcher tests trust this server; if it drifted from what the real client sends and parses,
they would pass against a fiction. So every check here goes through the real client.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Iterator

import pytest

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2

from harness.tpu_api import (DEFAULT_ZONES, NODE_ENUMS, QUEUED_STATE_ENUMS, FakeTpuApi, WorkerHost,
                             fake_host_key)

PARENT = "projects/test-proj/locations/us-east1-d"
QRS = f"{PARENT}/queuedResources"
QState = tpu_v2.QueuedResourceState.State
KEYS = {ip: fake_host_key(f"worker-{ip}") for ip in ("127.0.0.2", "127.0.0.3")}


def two_workers(node_id: str, accelerator_type: str) -> list[WorkerHost]:
    return [{"ip": ip, "host_keys": {"ssh-ed25519": KEYS[ip], "ecdsa-sha2-nistp256": f"ecdsa-sha2-nistp256 AAAA{i} x"}}
            for i, ip in enumerate(KEYS)]


@pytest.fixture
def api() -> Iterator[FakeTpuApi]:
    with FakeTpuApi(two_workers, op_delay=0.2) as server:
        yield server


def new_node(accelerator_type: str = "v6e-8") -> Any:
    return tpu_v2.Node(
        accelerator_type=accelerator_type,
        runtime_version="v6e-ubuntu-2404",
        network_config=tpu_v2.NetworkConfig(enable_external_ips=True),
        scheduling_config=tpu_v2.SchedulingConfig(spot=True),
        labels={"created-by": "mllm"},
        metadata={"ssh-keys": "root:ssh-ed25519 AAAAuser user@laptop"},
    )


def test_node_lifecycle_through_the_real_client(api: FakeTpuApi) -> None:
    ready: list[dict[str, Any]] = []
    api.on_create = ready.append
    # Exactly the construction the harness documents (and api.client() returns).
    client = tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": api.endpoint})
    name = f"{PARENT}/nodes/vm1"

    op = client.create_node(parent=PARENT, node=new_node(), node_id="vm1")
    assert client.get_node(name=name).state == tpu_v2.Node.State.CREATING
    started = time.monotonic()
    node = op.result(timeout=10)
    assert time.monotonic() - started < 5
    assert isinstance(node, tpu_v2.Node)
    assert node.name == name and node.state == tpu_v2.Node.State.READY
    assert node.health == tpu_v2.Node.Health.HEALTHY
    assert node.accelerator_type == "v6e-8" and node.runtime_version == "v6e-ubuntu-2404"
    assert node.scheduling_config.spot and node.labels["created-by"] == "mllm"
    assert [(e.ip_address, e.port, e.access_config.external_ip) for e in node.network_endpoints] == [
        ("127.0.0.2", 8470, "127.0.0.2"), ("127.0.0.3", 8470, "127.0.0.3")]
    assert node.create_time.year >= 2024
    assert isinstance(op.metadata, tpu_v2.OperationMetadata) and op.metadata.verb == "create"
    # The hook ran before the client saw the operation done, with the metadata as sent.
    assert [n["metadata"]["ssh-keys"] for n in ready] == ["root:ssh-ed25519 AAAAuser user@laptop"]
    # What the client sent: node id in the query, spot in the body.
    create = next(r for r in api.requests if r.method == "POST" and r.path.endswith("/nodes"))
    assert create.query["nodeId"] == ["vm1"] and create.body["schedulingConfig"] == {"spot": True}

    assert [n.name for n in client.list_nodes(parent=PARENT)] == [name]
    assert client.get_node(name=name).network_endpoints[1].ip_address == "127.0.0.3"

    # get_guest_attributes has no flattened arguments: it takes only `request=`.
    attrs = client.get_guest_attributes(request={"name": name, "query_path": "hostkeys/"}).guest_attributes
    assert len(attrs) == 2  # one per worker, in worker order (the type has no worker id)
    for worker, ip in zip(attrs, KEYS):
        items = {(i.namespace, i.key): i.value for i in worker.query_value.items}
        assert items[("hostkeys", "ssh-ed25519")] == KEYS[ip].split()[1]
        assert worker.query_path == "hostkeys/"
    only = client.get_guest_attributes(request=tpu_v2.GetGuestAttributesRequest(
        name=name, query_path="hostkeys/ssh-ed25519", worker_ids=["1"]))
    assert [[i.value for i in a.query_value.items] for a in only.guest_attributes] == [[KEYS["127.0.0.3"].split()[1]]]

    api.set_state("vm1", "PREEMPTED")
    assert client.get_node(name=name).state == tpu_v2.Node.State.PREEMPTED

    client.delete_node(name=name).result(timeout=10)
    with pytest.raises(gexc.NotFound):
        client.get_node(name=name)
    assert list(client.list_nodes(parent=PARENT)) == [] and api.nodes == {}


def test_errors_surface_as_the_real_client_raises_them(api: FakeTpuApi) -> None:
    client = api.client()
    # REST errors map by HTTP status: 403 is Forbidden (PermissionDenied is its gRPC-only subclass).
    api.fail_next(403, "Permission 'tpu.nodes.list' denied", "PERMISSION_DENIED")
    with pytest.raises(gexc.Forbidden, match="tpu.nodes.list") as denied:
        list(client.list_nodes(parent=PARENT))
    assert denied.value.code == 403
    assert list(client.list_nodes(parent=PARENT)) == []  # only the next request failed

    with pytest.raises(gexc.BadRequest, match="v9-8"):
        client.create_node(parent=PARENT, node=new_node("v9-8"), node_id="vm2")
    with pytest.raises(gexc.BadRequest, match="location"):
        client.create_node(parent="projects/test-proj/locations/mars", node=new_node(), node_id="vm2")
    with pytest.raises(gexc.NotFound):
        client.delete_node(name=f"{PARENT}/nodes/nope")

    client.create_node(parent=PARENT, node=new_node(), node_id="vm2")
    with pytest.raises(gexc.Conflict, match="already exists"):
        client.create_node(parent=PARENT, node=new_node(), node_id="vm2")

    # A failed operation maps by its google.rpc code: a stockout is ResourceExhausted.
    api.fail_next_operation("RESOURCE_EXHAUSTED", "no more capacity in us-east1-d")
    op = client.create_node(parent=PARENT, node=new_node(), node_id="vm3")
    api.finish_operations()
    with pytest.raises(gexc.ResourceExhausted, match="capacity"):
        op.result(timeout=10)
    assert set(api.nodes) == {f"{PARENT}/nodes/vm2"}


def test_stop_closes_the_endpoint() -> None:
    """Also the kept-alive connection the client pooled: a stopped API must look gone."""
    import requests

    api = FakeTpuApi().start()
    client = api.client()
    assert list(client.list_nodes(parent=PARENT)) == []
    api.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        list(client.list_nodes(parent=PARENT))


# -- queued resources ----------------------------------------------------------------------


def qr_node(accelerator_type: str = "v6e-8") -> Any:
    """A node spec's node, without scheduling config: a spot QR must put `spot` on the node itself."""
    return tpu_v2.Node(accelerator_type=accelerator_type, runtime_version="v6e-ubuntu-2404",
                       network_config=tpu_v2.NetworkConfig(enable_external_ips=True),
                       labels={"created-by": "mllm"}, metadata={"ssh-keys": "root:ssh-ed25519 AAAAuser user@laptop"})


def tpu_spec(node_id: str, accelerator_type: str = "v6e-8", parent: str = PARENT) -> Any:
    return tpu_v2.QueuedResource.Tpu(node_spec=[tpu_v2.QueuedResource.Tpu.NodeSpec(
        parent=parent, node_id=node_id, node=qr_node(accelerator_type))])


def spot_qr(node_id: str) -> Any:
    return tpu_v2.QueuedResource(tpu=tpu_spec(node_id), spot=tpu_v2.QueuedResource.Spot())


def watch(client: Any, name: str, until: set[Any], timeout: float = 5) -> list[Any]:
    """Poll a QR through the client until its state is in `until`: the distinct states seen, in order."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get_queued_resource(name=name).state.state
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in until:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"{name} never reached {until}: saw {seen}")


def state_data(qr: Any) -> str | None:
    """Which member of QueuedResourceState's `state_data` oneof the client parsed."""
    return tpu_v2.QueuedResourceState.pb(qr.state).WhichOneof("state_data")


def test_spot_queued_resource_lifecycle_through_the_real_client(api: FakeTpuApi) -> None:
    ready: list[dict[str, Any]] = []
    api.on_create = ready.append
    client = api.client()
    name, node_name = f"{QRS}/qr1", f"{PARENT}/nodes/qvm"
    api.hold_queued("qr1")  # before it exists: held from creation on

    op = client.create_queued_resource(parent=PARENT, queued_resource_id="qr1", queued_resource=spot_qr("qvm"))
    assert client.get_queued_resource(name=name).state.state == QState.ACCEPTED
    queued = op.result(timeout=10)
    # As in Google's samples, the create operation is done once the request is queued, not provisioned.
    assert isinstance(queued, tpu_v2.QueuedResource) and queued.name == name
    assert queued.state.state == QState.WAITING_FOR_RESOURCES
    assert isinstance(op.metadata, tpu_v2.OperationMetadata) and op.metadata.target == name
    create = next(r for r in api.requests if r.method == "POST" and r.path.endswith("/queuedResources"))
    assert create.query["queuedResourceId"] == ["qr1"] and create.body["spot"] == {}
    spec = create.body["tpu"]["nodeSpec"][0]
    assert spec["nodeId"] == "qvm" and "schedulingConfig" not in spec["node"]  # spot comes from the tier

    time.sleep(api.qr_wait + 0.1)  # held: still waiting after qr_wait, and no node yet
    assert client.get_queued_resource(name=name).state.state == QState.WAITING_FOR_RESOURCES
    with pytest.raises(gexc.NotFound):
        client.get_node(name=node_name)

    api.release_queued("qr1")
    assert client.get_queued_resource(name=name).state.state == QState.PROVISIONING
    creating = client.get_node(name=node_name)
    assert creating.state == tpu_v2.Node.State.CREATING and creating.queued_resource == name
    assert creating.scheduling_config.spot and not ready
    assert watch(client, name, {QState.ACTIVE}) in ([QState.PROVISIONING, QState.ACTIVE], [QState.ACTIVE])

    qr = client.get_queued_resource(name=name)
    assert state_data(qr) == "active_data" and "spot" in qr and "guaranteed" not in qr
    assert qr.tpu.node_spec[0].parent == PARENT and qr.tpu.node_spec[0].node.accelerator_type == "v6e-8"
    node = client.get_node(name=node_name)
    assert node.state == tpu_v2.Node.State.READY and node.health == tpu_v2.Node.Health.HEALTHY
    assert node.queued_resource == name and node.scheduling_config.spot and node.labels["created-by"] == "mllm"
    assert [(e.ip_address, e.access_config.external_ip) for e in node.network_endpoints] == [
        ("127.0.0.2", "127.0.0.2"), ("127.0.0.3", "127.0.0.3")]
    # on_create saw the node READY, with the metadata the spec asked for, before the QR was ACTIVE.
    assert [(n["name"], n["state"], n["queuedResource"], n["metadata"]["ssh-keys"]) for n in ready] == [
        (node_name, "READY", name, "root:ssh-ed25519 AAAAuser user@laptop")]
    assert api.queued_resource("qr1")["state"] == {"state": "ACTIVE", "activeData": {}}


def test_queued_resource_list_and_delete(api: FakeTpuApi) -> None:
    client = api.client()
    active, waiting = f"{QRS}/active", f"{QRS}/waiting"
    api.hold_queued("waiting")
    client.create_queued_resource(parent=PARENT, queued_resource_id="waiting", queued_resource=spot_qr("vm-w"))
    client.create_queued_resource(parent=PARENT, queued_resource_id="active", queued_resource=spot_qr("vm-a"))
    watch(client, active, {QState.ACTIVE})
    assert [q.name for q in client.list_queued_resources(parent=PARENT)] == [active, waiting]
    assert list(client.list_queued_resources(parent="projects/test-proj/locations/us-central1-a")) == []

    # Without force, a QR whose node is up is refused, with the real API's message and status.
    with pytest.raises(gexc.BadRequest, match="not supported when state is ACTIVE") as refused:
        client.delete_queued_resource(name=active)
    assert refused.value.response.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert client.get_node(name=f"{PARENT}/nodes/vm-a").state == tpu_v2.Node.State.READY

    # A waiting QR (no node yet) goes without force, and never provisions afterwards.
    client.delete_queued_resource(name=waiting)
    assert client.get_queued_resource(name=waiting).state.state == QState.DELETING
    api.release_queued("waiting")
    assert client.get_queued_resource(name=waiting).state.state == QState.DELETING

    op = client.delete_queued_resource(request={"name": active, "force": True})
    deletes = [r for r in api.requests if r.method == "DELETE"]
    assert [r.query.get("force") for r in deletes] == [None, None, ["true"]]  # sent only when set
    assert client.get_queued_resource(name=active).state.state == QState.DELETING
    assert client.get_node(name=f"{PARENT}/nodes/vm-a").state == tpu_v2.Node.State.DELETING
    op.result(timeout=10)
    for gone in (active, waiting):
        with pytest.raises(gexc.NotFound):
            client.get_queued_resource(name=gone)
    with pytest.raises(gexc.NotFound):
        client.get_node(name=f"{PARENT}/nodes/vm-a")
    assert api.nodes == {} and api.queued_resources == {}


def test_failed_queued_resources_carry_their_error(api: FakeTpuApi) -> None:
    client = api.client()
    name = f"{QRS}/stockout"
    api.fail_next_queued_resource("RESOURCE_EXHAUSTED", "no more capacity in us-east1-d")
    client.create_queued_resource(parent=PARENT, queued_resource_id="stockout", queued_resource=spot_qr("vm-s"))
    seen = watch(client, name, {QState.FAILED})
    assert QState.PROVISIONING not in seen and seen[-1] == QState.FAILED
    qr = client.get_queued_resource(name=name)
    assert state_data(qr) == "failed_data"
    error = qr.state.failed_data.error
    assert (error.code, error.message) == (8, "no more capacity in us-east1-d")  # 8: RESOURCE_EXHAUSTED
    assert qr.state.state_initiator == tpu_v2.QueuedResourceState.StateInitiator.SERVICE
    assert api.nodes == {}
    client.delete_queued_resource(name=name)  # FAILED goes without force
    api.finish_operations()
    assert api.queued_resources == {}

    # A failing on_create hook fails the QR the same way, and takes the node away.
    def broken(node: dict[str, Any]) -> None:
        raise RuntimeError("no sshd")

    api.on_create = broken
    client.create_queued_resource(parent=PARENT, queued_resource_id="hook", queued_resource=spot_qr("vm-h"))
    api.finish_operations()
    qr = client.get_queued_resource(name=f"{QRS}/hook")
    assert qr.state.state == QState.FAILED and qr.state.failed_data.error.code == 13
    assert "on_create hook failed" in qr.state.failed_data.error.message
    assert "no sshd" in qr.state.failed_data.error.message
    assert api.nodes == {}


def test_preemption_suspends_a_queued_resource(api: FakeTpuApi) -> None:
    client = api.client()
    name, node_name = f"{QRS}/spot", f"{PARENT}/nodes/vm-p"
    service = tpu_v2.QueuedResourceState.StateInitiator.SERVICE
    client.create_queued_resource(parent=PARENT, queued_resource_id="spot", queued_resource=spot_qr("vm-p"))
    api.finish_operations()  # waits, provisioning and the node's boot, all at once
    assert client.get_queued_resource(name=name).state.state == QState.ACTIVE

    api.set_state("vm-p", "PREEMPTED")
    qr = client.get_queued_resource(name=name)
    assert (qr.state.state, qr.state.state_initiator) == (QState.SUSPENDING, service)
    assert watch(client, name, {QState.SUSPENDED})[-1] == QState.SUSPENDED
    qr = client.get_queued_resource(name=name)
    assert state_data(qr) == "suspended_data" and qr.state.state_initiator == service
    assert client.get_node(name=node_name).state == tpu_v2.Node.State.PREEMPTED  # still listed

    # SUSPENDED goes without force; the PREEMPTED node is left for the client to delete.
    client.delete_queued_resource(name=name)
    api.finish_operations()
    with pytest.raises(gexc.NotFound):
        client.get_queued_resource(name=name)
    assert client.get_node(name=node_name).state == tpu_v2.Node.State.PREEMPTED
    client.delete_node(name=node_name)
    api.finish_operations()
    assert api.nodes == {}

    # Deleting a QR's node directly suspends the QR too, on the user's initiative.
    client.create_queued_resource(parent=PARENT, queued_resource_id="mine", queued_resource=spot_qr("vm-m"))
    api.finish_operations()
    client.delete_node(name=f"{PARENT}/nodes/vm-m")
    qr = client.get_queued_resource(name=f"{QRS}/mine")
    user = tpu_v2.QueuedResourceState.StateInitiator.USER
    assert (qr.state.state, qr.state.state_initiator) == (QState.SUSPENDING, user)
    api.finish_operations()
    assert client.get_queued_resource(name=f"{QRS}/mine").state.state == QState.SUSPENDED and api.nodes == {}

    api.set_queued_state("mine", "FAILED", code="INTERNAL", message="set by the test")
    qr = client.get_queued_resource(name=f"{QRS}/mine")
    assert qr.state.state == QState.FAILED and qr.state.failed_data.error.message == "set by the test"
    assert qr.state.state_initiator == service


def test_guaranteed_reservation_and_queueing_policy(api: FakeTpuApi) -> None:
    client = api.client()
    name = f"{QRS}/reserved"
    reservation = f"{PARENT}/reservations/res1"
    api.hold_queued("reserved")
    client.create_queued_resource(parent=PARENT, queued_resource_id="reserved", queued_resource=tpu_v2.QueuedResource(
        tpu=tpu_spec("vm-r"), guaranteed=tpu_v2.QueuedResource.Guaranteed(min_duration=timedelta(hours=1)),
        reservation_name=reservation,
        queueing_policy=tpu_v2.QueuedResource.QueueingPolicy(valid_until_duration=timedelta(seconds=90))))
    create = next(r for r in api.requests if r.method == "POST" and r.path.endswith("/queuedResources"))
    assert create.body["guaranteed"] == {"minDuration": "3600s"} and create.body["reservationName"] == reservation
    assert create.body["queueingPolicy"] == {"validUntilDuration": "90s"}

    got = client.get_queued_resource(name=name)
    assert "guaranteed" in got and "spot" not in got
    assert got.guaranteed.min_duration == timedelta(hours=1) and got.reservation_name == reservation
    # The relative deadline comes back as an absolute one (the fields are a oneof), as Google does it.
    policy = tpu_v2.QueuedResource.QueueingPolicy.pb(got.queueing_policy)
    assert policy.WhichOneof("start_timing_constraints") == "valid_until_time"
    assert got.queueing_policy.valid_until_time - got.create_time == timedelta(seconds=90)

    api.release_queued("reserved")
    api.finish_operations()
    assert client.get_queued_resource(name=name).state.state == QState.ACTIVE
    node = client.get_node(name=f"{PARENT}/nodes/vm-r")
    assert node.state == tpu_v2.Node.State.READY and not node.scheduling_config.spot and node.queued_resource == name

    # A deadline that passes while the QR still waits fails it.
    api.hold_queued("late")
    client.create_queued_resource(parent=PARENT, queued_resource_id="late", queued_resource=tpu_v2.QueuedResource(
        tpu=tpu_spec("vm-l"), spot=tpu_v2.QueuedResource.Spot(),
        queueing_policy=tpu_v2.QueuedResource.QueueingPolicy(valid_until_duration=timedelta(seconds=0.3))))
    assert watch(client, f"{QRS}/late", {QState.FAILED})[-1] == QState.FAILED
    late = client.get_queued_resource(name=f"{QRS}/late")
    assert late.state.failed_data.error.code == 4 and "deadline" in late.state.failed_data.error.message
    assert f"{PARENT}/nodes/vm-l" not in api.nodes

    # Nor does a QR provision before its start time, even through finish_operations.
    client.create_queued_resource(parent=PARENT, queued_resource_id="after", queued_resource=tpu_v2.QueuedResource(
        tpu=tpu_spec("vm-after"), spot=tpu_v2.QueuedResource.Spot(),
        queueing_policy=tpu_v2.QueuedResource.QueueingPolicy(valid_after_duration=timedelta(seconds=0.5))))
    api.finish_operations()
    after = client.get_queued_resource(name=f"{QRS}/after")
    assert after.state.state == QState.WAITING_FOR_RESOURCES
    assert after.queueing_policy.valid_after_time - after.create_time == timedelta(seconds=0.5)
    time.sleep(0.6)
    api.finish_operations()
    assert client.get_queued_resource(name=f"{QRS}/after").state.state == QState.ACTIVE


def test_bad_queued_resources_raise_what_the_rest_client_raises(api: FakeTpuApi) -> None:
    import requests

    client = api.client()

    def create(qr_id: str, qr: Any) -> Any:
        return client.create_queued_resource(parent=PARENT, queued_resource_id=qr_id, queued_resource=qr)

    with pytest.raises(gexc.BadRequest, match="queued resource id"):
        create("Bad_Id", spot_qr("vm-x"))
    with pytest.raises(gexc.BadRequest, match="node id"):
        create("ok", spot_qr("Bad_Node"))
    with pytest.raises(gexc.BadRequest, match="v9-8"):
        create("ok", tpu_v2.QueuedResource(tpu=tpu_spec("vm-x", "v9-8"), spot={}))
    with pytest.raises(gexc.BadRequest, match="parent"):
        create("ok", tpu_v2.QueuedResource(tpu=tpu_spec("vm-x", parent="projects/test-proj/locations/us-east5-b")))
    with pytest.raises(gexc.BadRequest, match="node_spec"):
        create("ok", tpu_v2.QueuedResource(spot={}))
    with pytest.raises(gexc.BadRequest, match="reservation_name"):
        create("ok", tpu_v2.QueuedResource(tpu=tpu_spec("vm-x"), guaranteed={}, reservation_name="res1"))
    two = tpu_v2.QueuedResource(tpu=tpu_spec("vm-x"))
    two.tpu.node_spec.append(tpu_spec("vm-y").node_spec[0])
    with pytest.raises(gexc.MethodNotImplemented, match="multislice"):
        create("ok", two)

    # spot and guaranteed are a oneof: the client keeps only the last set, so "both" needs raw HTTP.
    assert "spot" not in tpu_v2.QueuedResource(spot={}, guaranteed={})
    body = {"tpu": {"nodeSpec": [{"parent": PARENT, "nodeId": "vm-x",
                                  "node": {"acceleratorType": "v6e-8", "runtimeVersion": "v6e-ubuntu-2404"}}]},
            "spot": {}, "guaranteed": {}}
    response = requests.post(f"{api.endpoint}/v2/{QRS}", params={"queuedResourceId": "both"}, json=body, timeout=10)
    both = gexc.from_http_response(response)
    assert isinstance(both, gexc.BadRequest) and "oneof" in both.message
    assert api.queued_resources == {}

    create("dup", spot_qr("vm-d"))
    with pytest.raises(gexc.Conflict, match="queuedResources/dup"):
        create("dup", spot_qr("vm-other"))
    with pytest.raises(gexc.Conflict, match="nodes/vm-d"):  # the node id is claimed by the waiting QR
        create("dup2", spot_qr("vm-d"))
    client.create_node(parent=PARENT, node=new_node(), node_id="plain")
    with pytest.raises(gexc.Conflict, match="nodes/plain"):
        create("dup3", spot_qr("plain"))
    assert list(api.queued_resources) == [f"{QRS}/dup"]


def test_list_locations_returns_the_zones(api: FakeTpuApi) -> None:
    got = api.client().list_locations(request={"name": "projects/test-proj"})
    assert [loc.location_id for loc in got.locations] == list(DEFAULT_ZONES)
    assert {"us-east1-d", "us-central1-a", "europe-west4-a", "us-east5-b"} <= set(DEFAULT_ZONES)
    assert got.locations[0].name == f"projects/test-proj/locations/{DEFAULT_ZONES[0]}"
    (sent,) = [r for r in api.requests if r.path.endswith("/locations")]
    assert sent.method == "GET" and sent.path == "/v2/projects/test-proj/locations"

    with FakeTpuApi(zones=["us-east5-b"]) as small:
        client = small.client()
        assert [loc.name for loc in client.list_locations(request={"name": "projects/p"}).locations] == [
            "projects/p/locations/us-east5-b"]
        assert client.get_location(request={"name": "projects/p/locations/us-east5-b"}).location_id == "us-east5-b"
        with pytest.raises(gexc.NotFound):
            client.get_location(request={"name": "projects/p/locations/us-east1-d"})
    with pytest.raises(ValueError, match="useast1"):
        FakeTpuApi(zones=["useast1"])


def test_enum_numbers_match_the_protos(api: FakeTpuApi) -> None:
    import requests

    def members(enum: Any) -> dict[str, int]:
        return {m.name: m.value for m in enum}

    assert NODE_ENUMS == {"state": members(tpu_v2.Node.State), "health": members(tpu_v2.Node.Health),
                          "apiVersion": members(tpu_v2.Node.ApiVersion)}
    assert QUEUED_STATE_ENUMS == {"state": members(tpu_v2.QueuedResourceState.State),
                                  "stateInitiator": members(tpu_v2.QueuedResourceState.StateInitiator)}

    # Names by default, numbers when asked for, as the real API does.
    api.hold_queued("enums")
    api.client().create_queued_resource(parent=PARENT, queued_resource_id="enums", queued_resource=spot_qr("vm-e"))
    api.finish_operations()
    url = f"{api.endpoint}/v2/{QRS}/enums"
    assert requests.get(url, timeout=10).json()["state"] == {"state": "WAITING_FOR_RESOURCES"}
    as_int = requests.get(url, params={"$alt": "json;enum-encoding=int"}, timeout=10).json()["state"]
    assert as_int == {"state": tpu_v2.QueuedResourceState.State.WAITING_FOR_RESOURCES.value}


def test_offers_and_project_metadata(api: FakeTpuApi) -> None:
    """What a zone offers, through the real client; the Compute Engine project's metadata, as
    launcher.compute reads it."""
    import requests

    client = api.client()
    assert "v6e-8" in [t.type_ for t in client.list_accelerator_types(parent=PARENT)]
    api.offer("us-east1-d", types=["v5litepod-8"])
    listed = list(client.list_accelerator_types(parent=PARENT))
    assert [(t.name, t.type_) for t in listed] == [(f"{PARENT}/acceleratorTypes/v5litepod-8", "v5litepod-8")]
    assert "v6e-ubuntu-2404" in [v.version for v in client.list_runtime_versions(parent=PARENT)]
    other = "projects/test-proj/locations/us-central1-a"
    assert "v6e-8" in [t.type_ for t in client.list_accelerator_types(parent=other)]
    url = f"{api.endpoint}/compute/v1/projects/test-proj"
    assert "items" not in requests.get(url, timeout=10).json()["commonInstanceMetadata"]
    api.set_project_metadata("test-proj", "enable-oslogin", "TRUE")
    assert requests.get(url, timeout=10).json()["commonInstanceMetadata"]["items"] == [
        {"key": "enable-oslogin", "value": "TRUE"}]
