"""The fake Cloud TPU API speaks the protocol the real `google-cloud-tpu` REST client expects.

Why: launcher tests trust this server; if it drifted from what the real client sends and parses,
they would pass against a fiction. So every check here goes through the real client.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2

from harness.tpu_api import FakeTpuApi, WorkerHost, fake_host_key

PARENT = "projects/test-proj/locations/us-east1-d"
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
