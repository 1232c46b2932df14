"""`mllm vm ...` against a local Cloud TPU v2 REST server, through the real google-cloud-tpu client."""

from __future__ import annotations

import json
import stat
import time

import pytest

from conftest import launcher_env, mllm
from harness.tpu_api import FakeTpuApi


@pytest.fixture()
def api():
    with FakeTpuApi(op_delay=0.1) as server:
        yield server


def test_create_list_describe_delete(tmp_path, api):
    env = launcher_env(tmp_path, api.endpoint)
    dry = mllm("vm", "create", "demo", "--zone", "us-east1-d", "--type", "v6e-8", "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0 and not api.nodes and not any(r.method == "POST" for r in api.requests)
    assert json.loads(dry.stdout.split("\n", 1)[1])["runtimeVersion"] == "v6e-ubuntu-2404"

    out = mllm("vm", "create", "demo", "--zone", "us-east1-d", "--type", "v6e-8", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    node = api.node("demo")
    assert node["acceleratorType"] == "v6e-8" and node["runtimeVersion"] == "v6e-ubuntu-2404"
    assert node["labels"] == {"created-by": "mllm"} and node["schedulingConfig"].get("spot") is True
    assert node["networkConfig"]["enableExternalIps"] is True
    key_file = tmp_path / "config" / "mllm" / "id_ed25519"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = (tmp_path / "config" / "mllm" / "id_ed25519.pub").read_text().strip()
    assert node["metadata"]["ssh-keys"] == f"root:{public}" and public.startswith("ssh-ed25519 ") and public.endswith(" mllm")

    listed = mllm("vm", "list", "--json", cwd=tmp_path, env=env)  # zone remembered from create
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["type"], r["state"], r["workers"], r["spot"]) for r in rows] == [("demo", "v6e-8", "READY", 1, True)]
    table = mllm("vm", "list", cwd=tmp_path, env=env)
    assert "demo" in table.stdout and "READY" in table.stdout

    described = json.loads(mllm("vm", "describe", cwd=tmp_path, env=env).stdout)  # vm remembered too
    assert described["name"] == "demo" and described["zone"] == "us-east1-d"

    on_demand = mllm("vm", "create", "--zone", "us-east1-d", "--type", "v5litepod-4", "--on-demand", cwd=tmp_path, env=env)
    assert on_demand.returncode == 0, on_demand.stderr
    (auto_name,) = [n.rsplit("/", 1)[-1] for n in api.nodes if not n.endswith("/demo")]
    assert auto_name.startswith("mllm-v5litepod-4-") and api.node(auto_name)["runtimeVersion"] == "v2-alpha-tpuv5-lite"

    before = len(api.requests)
    queued = mllm("vm", "create", "later", "--zone", "us-east1-d", "--type", "v6e-8", "--async", cwd=tmp_path, env=env)
    assert queued.returncode == 0 and "requested later" in queued.stdout
    assert not any("/operations/" in r.path for r in api.requests[before:]), "--async must not wait"
    api.finish_operations()
    assert mllm("vm", "delete", "--vm", "later", "--yes", cwd=tmp_path, env=env).returncode == 0

    api.set_state(auto_name, "PREEMPTED")
    gone = mllm("vm", "delete", "--stale", "--yes", cwd=tmp_path, env=env)
    assert gone.returncode == 0 and f"deleted {auto_name} (PREEMPTED)" in gone.stdout
    described = json.loads(mllm("vm", "describe", "demo", cwd=tmp_path, env=env).stdout)  # gcloud's habit: NAME
    assert described["name"] == "demo" and described["queued"] is None
    deleted = mllm("vm", "delete", "demo", "--yes", cwd=tmp_path, env=env)
    assert deleted.returncode == 0 and not api.nodes


@pytest.mark.parametrize(
    "args, message",
    [
        (["vm", "create", "x", "--zone", "us-east1-d", "--type", "v9-8"], "error: --type 'v9-8': expected <generation>-<size>"),
        (["vm", "create", "x", "--zone", "useast1", "--type", "v6e-8"], "error: --zone 'useast1': expected a zone such as us-east1-d"),
        (["vm", "describe", "--vm", "nope", "--zone", "us-east1-d"], "error: TPU VM nope in us-east1-d: not found"),
        (["vm", "delete", "--vm", "nope", "--zone", "us-east1-d", "--yes"], "error: TPU VM nope in us-east1-d: not found"),
        (["env", "push", "--src", "missing.env", "--vm", "x", "--zone", "us-east1-d"], "error: --src missing.env: env file not found"),
        (["vm", "describe", "--zone", "us-east1-d"], "error: --vm is required"),
        (["vm", "describe", "a", "--vm", "b", "--zone", "us-east1-d"], "error: NAME 'a' and --vm 'b' differ: give one"),
        (["vm", "create", "x", "--zone", "us-east1-d", "--guaranteed"], "error: --guaranteed, --reserved and --valid-for need --queued"),
        (["vm", "create", "x", "--zone", "us-east1-d", "--queued", "--valid-for", "soon"],
         "error: --valid-for 'soon': expected a duration such as 6h, 90m, 1d12h or 3600s"),
        (["vm", "delete", "x", "--stale", "--zone", "us-east1-d", "--yes"], "error: --stale deletes every dead VM"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, api, args, message):
    out = mllm(*args, cwd=tmp_path, env=launcher_env(tmp_path, api.endpoint))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith(message) and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not api.nodes and not any(r.method == "POST" for r in api.requests)


def test_api_refusals_become_one_line(tmp_path, api):
    env = launcher_env(tmp_path, api.endpoint)
    api.fail_next(403, "caller does not have permission tpu.nodes.create")
    out = mllm("vm", "create", "x", "--zone", "us-east1-d", "--type", "v6e-8", cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stderr.startswith("error: creating TPU VM x in us-east1-d: permission denied")
    assert len(out.stderr.strip().splitlines()) == 1 and not api.nodes
    api.fail_next_operation("RESOURCE_EXHAUSTED", "no more capacity in the zone")
    out = mllm("vm", "create", "x", "--zone", "us-east1-d", "--type", "v6e-8", cwd=tmp_path, env=env)
    assert out.returncode == 2 and "quota or capacity exhausted" in out.stderr and not api.nodes


def test_worker_out_of_range(tmp_path, api):
    env = launcher_env(tmp_path, api.endpoint)
    assert mllm("vm", "create", "one", "--zone", "us-east1-d", "--type", "v6e-8", cwd=tmp_path, env=env).returncode == 0
    out = mllm("exec", "--worker", "3", "--", "true", cwd=tmp_path, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --worker 3: out of range, the VM has 1 worker(s) (0..0)"


def test_queued_create_waits_then_delete_removes_node_and_queue(tmp_path):
    with FakeTpuApi(op_delay=0.1, qr_wait=1.0) as api:
        env = launcher_env(tmp_path, api.endpoint)
        out = mllm("vm", "create", "q1", "--queued", "--zone", "us-east1-d", "--type", "v6e-8", "--valid-for", "6h",
                   "--poll", "0.1", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        states = [line.split(": ")[1].split()[0] for line in out.stderr.splitlines() if line.startswith("queued resource q1: ")]
        assert states[0] in ("CREATING", "ACCEPTED") and "WAITING_FOR_RESOURCES" in states and states[-1] == "ACTIVE"
        assert states.index("WAITING_FOR_RESOURCES") < states.index("ACTIVE"), states
        (qr,) = api.queued_resources.values()
        (sent,) = [r.body for r in api.requests if r.method == "POST" and r.path.endswith("/queuedResources")]
        assert "spot" in qr and sent["queueingPolicy"] == {"validUntilDuration": "21600s"}
        assert qr["tpu"]["nodeSpec"][0]["nodeId"] == "q1" and api.node("q1")["state"] == "READY"
        rows = json.loads(mllm("vm", "list", "--json", cwd=tmp_path, env=env).stdout)
        assert [(r["name"], r["state"], r["queued"], r["spot"]) for r in rows] == [("q1", "READY", "ACTIVE", True)]
        assert "ACTIVE" in mllm("vm", "list", cwd=tmp_path, env=env).stdout
        gone = mllm("vm", "delete", "q1", "--yes", cwd=tmp_path, env=env)
        assert gone.returncode == 0 and "deleted q1 (VM and queued resource q1)" in gone.stdout, gone.stdout
        assert not api.nodes and not api.queued_resources


def test_failed_queue_prints_its_reason_and_stale_ones_are_cleared(tmp_path):
    with FakeTpuApi(op_delay=0.1, qr_wait=0.3) as api:
        env = launcher_env(tmp_path, api.endpoint)
        api.fail_next_queued_resource("RESOURCE_EXHAUSTED", "no v6e-8 spot capacity in us-east1-d")
        out = mllm("vm", "create", "q2", "--queued", "--zone", "us-east1-d", "--poll", "0.1", cwd=tmp_path, env=env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.splitlines()[-1] == ("error: queued resource q2 in us-east1-d is FAILED: no v6e-8 spot capacity "
                                               "in us-east1-d (deleted it)")
        assert not api.queued_resources and not api.nodes  # a dead queue is not left eating quota

        # Left behind by others: a FAILED queue (asked for with --async), a SUSPENDED one (its spot
        # node preempted), a PREEMPTED plain VM; and a healthy VM that must stay.
        api.fail_next_queued_resource("RESOURCE_EXHAUSTED", "stockout")
        for args in (["dead", "--queued", "--async"], ["spotq", "--queued"], ["plain"], ["keep"]):
            made = mllm("vm", "create", *args, "--zone", "us-east1-d", "--poll", "0.1", cwd=tmp_path, env=env)
            assert made.returncode == 0, made.stderr
        api.set_state("spotq", "PREEMPTED")
        api.set_state("plain", "PREEMPTED")
        rows = {r["name"]: r for r in json.loads(mllm("vm", "list", "--json", cwd=tmp_path, env=env).stdout)}
        assert rows["dead"]["state"] == "FAILED" and rows["dead"]["reason"] == "stockout"
        assert rows["spotq"]["queued"] == "SUSPENDED" and rows["plain"]["state"] == "PREEMPTED"

        before = len(api.requests)
        dry = mllm("vm", "delete", "--stale", "--dry-run", cwd=tmp_path, env=env)
        assert dry.returncode == 0, dry.stderr
        base = f"{api.endpoint}/v2/projects/test-project/locations/us-east1-d"
        assert sorted(dry.stdout.splitlines()) == sorted([f"DELETE {base}/queuedResources/dead?force=true",
                                                          f"DELETE {base}/queuedResources/spotq?force=true",
                                                          f"DELETE {base}/nodes/plain"])
        assert all(r.method == "GET" for r in api.requests[before:])
        cleared = mllm("vm", "delete", "--stale", "--yes", cwd=tmp_path, env=env)
        assert cleared.returncode == 0, cleared.stderr
        assert [r["name"] for r in json.loads(mllm("vm", "list", "--json", cwd=tmp_path, env=env).stdout)] == ["keep"]
        assert not api.queued_resources
        nothing = mllm("vm", "delete", "--stale", "--yes", cwd=tmp_path, env=env)
        assert nothing.returncode == 0 and "nothing stale in us-east1-d" in nothing.stdout


def test_dry_run_sends_nothing(tmp_path):
    with FakeTpuApi(op_delay=0.1) as api:
        env = launcher_env(tmp_path, api.endpoint)
        base = f"{api.endpoint}/v2/projects/test-project/locations/us-east1-d"
        queued = mllm("vm", "create", "dq", "--queued", "--reserved", "my-res", "--zone", "us-east1-d", "--dry-run",
                      cwd=tmp_path, env=env)
        assert queued.returncode == 0, queued.stderr
        line, body = queued.stdout.split("\n", 1)
        assert line == f"POST {base}/queuedResources?queuedResourceId=dq"
        body = json.loads(body)
        assert body["reservationName"] == "projects/test-project/locations/us-east1-d/reservations/my-res"
        assert "spot" not in body and body["tpu"]["nodeSpec"][0]["node"]["acceleratorType"] == "v6e-8"
        plain = mllm("vm", "create", "dn", "--zone", "us-east1-d", "--dry-run", cwd=tmp_path, env=env)
        assert plain.stdout.startswith(f"POST {base}/nodes?nodeId=dn\n")
        assert json.loads(plain.stdout.split("\n", 1)[1])["schedulingConfig"] == {"spot": True}
        assert not (tmp_path / "config" / "mllm" / "id_ed25519").exists()  # not even a key is made
        assert mllm("vm", "create", "real", "--zone", "us-east1-d", cwd=tmp_path, env=env).returncode == 0
        before = len(api.requests)
        dry = mllm("vm", "delete", "real", "--dry-run", cwd=tmp_path, env=env)
        assert dry.returncode == 0 and dry.stdout.strip() == f"DELETE {base}/nodes/real"
        assert all(r.method == "GET" for r in api.requests[before:]) and api.node("real")["state"] == "READY"
        assert not any(r.method in ("POST", "DELETE") and "/dq" in r.path + str(r.query) for r in api.requests)


def test_dry_run_prints_network_identity_and_os_login(tmp_path):
    """What a managed project needs goes into the request: its VPC, internal IPs only, firewall
    tags, the VM's service account and scopes; OS Login is off for the VM (root's metadata key
    must work where the project turns OS Login on) unless --os-login."""
    with FakeTpuApi(op_delay=0.1) as api:
        env = launcher_env(tmp_path, api.endpoint)
        out = mllm("vm", "create", "net", "--zone", "us-east1-d", "--dry-run", "--network", "corp-vpc",
                   "--subnetwork", "projects/host-proj/regions/us-east1/subnetworks/tpu", "--no-external-ip",
                   "--tag", "mllm-ssh", "--tag", "allow-gloo", "--service-account", "trainer@p-123.iam.gserviceaccount.com",
                   "--scopes", "https://www.googleapis.com/auth/devstorage.read_write,https://www.googleapis.com/auth/logging.write",
                   cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        node = json.loads(out.stdout.split("\n", 1)[1])
        assert node["networkConfig"] == {"network": "corp-vpc",
                                         "subnetwork": "projects/host-proj/regions/us-east1/subnetworks/tpu"}
        assert node["tags"] == ["mllm-ssh", "allow-gloo"]
        assert node["serviceAccount"] == {"email": "trainer@p-123.iam.gserviceaccount.com", "scope": [
            "https://www.googleapis.com/auth/devstorage.read_write", "https://www.googleapis.com/auth/logging.write"]}
        assert node["metadata"]["enable-oslogin"] == "FALSE" and node["metadata"]["ssh-keys"].startswith("root:ssh-ed25519 ")
        queued = mllm("vm", "create", "osl", "--zone", "us-east1-d", "--dry-run", "--queued", "--os-login",
                      "--service-account", "t@p-123.iam.gserviceaccount.com", cwd=tmp_path, env=env)
        spec = json.loads(queued.stdout.split("\n", 1)[1])["tpu"]["nodeSpec"][0]["node"]
        assert spec["metadata"] == {"enable-oslogin": "TRUE"} and spec["networkConfig"] == {"enableExternalIps": True}
        assert spec["serviceAccount"]["scope"] == ["https://www.googleapis.com/auth/cloud-platform"]
        for args, message in ((("--tag", "Bad_Tag"), "--tag 'Bad_Tag'"), (("--scopes", "x"), "--scopes 'x'"),
                              (("--service-account", "nobody"), "--service-account 'nobody'"),
                              (("--network", "a b"), "--network 'a b'")):
            bad = mllm("vm", "create", "x", "--zone", "us-east1-d", "--dry-run", *args, cwd=tmp_path, env=env)
            assert bad.returncode == 2 and bad.stderr.startswith(f"error: {message}") and not bad.stdout, bad.stderr
        assert not api.requests


def test_the_supervisor_recreates_the_same_network_and_identity(tmp_path):
    """What `mllm watch` records of a live VM (VmRequest.of_node) makes the same request again."""
    from launcher import cloud

    with FakeTpuApi(op_delay=0.1) as api:
        env = launcher_env(tmp_path, api.endpoint)
        flags = ["--network", "corp-vpc", "--subnetwork", "tpu-sub", "--no-external-ip", "--tag", "ssh",
                 "--service-account", "t@p-123.iam.gserviceaccount.com", "--os-login", "--on-demand"]
        assert mllm("vm", "create", "twin", "--zone", "us-east1-d", *flags, cwd=tmp_path, env=env).returncode == 0
        z = cloud.Zone("test-project", "us-east1-d", api.client())
        again = cloud.VmRequest.of_node(z.get("twin"), None)
        first = cloud.VmRequest.checked("twin", "v6e-8", "auto", False, False, False, None, None, cloud.Network.checked(
            "corp-vpc", "tpu-sub", False, ["ssh"], "t@p-123.iam.gserviceaccount.com"), os_login=True)
        assert again == first
        assert cloud.as_json(z.node_spec(again, False, "k")) == cloud.as_json(z.node_spec(first, False, "k"))


def test_an_api_that_keeps_failing_makes_the_supervisor_unsure_not_dead(tmp_path):
    """The supervisor's look at a run whose API refuses (after its retries) is "unknown": the
    loop waits out MLLM_WATCH_API_GRACE instead of ending the watch or deleting anything."""
    from launcher import cloud, watch

    with FakeTpuApi(op_delay=0.1) as api:
        z = cloud.Zone("test-project", "us-east1-d", api.client())
        plan = watch.Plan("r", "nanogpt", "c.yaml", [], "sha", "gone", "us-east1-d", "test-project")
        assert watch.look(z, plan, connect=lambda: None).kind == "dead"  # the API says: no such VM
        api.fail_next(403, "Cloud TPU API has not been used in project test-project", times=2)
        seen = watch.look(z, plan, connect=lambda: None)
        assert seen.kind == "unknown" and "permission denied" in seen.why
        assert watch.Timing.resolve().api_grace == 900.0


def test_three_503s_in_a_row_are_ridden_out_and_a_failed_create_operation_is_one_line(tmp_path):
    """One bad minute of the API is not fatal: read calls retry 503s; a queued create whose
    operation the API fails (a type not offered there) is reported at once, not after --timeout."""
    with FakeTpuApi(op_delay=0.1, qr_wait=0.2) as api:
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "up", "--zone", "us-east1-d", cwd=tmp_path, env=env).returncode == 0
        api.fail_next(503, "The service is currently unavailable.", method="GET", times=3)
        listed = mllm("vm", "list", "--zone", "us-east1-d", "--json", cwd=tmp_path, env=env)
        assert listed.returncode == 0, listed.stderr
        assert [r["name"] for r in json.loads(listed.stdout)] == ["up"]
        assert sum(r.method == "GET" for r in api.requests) >= 4
        api.fail_next_operation("INVALID_ARGUMENT", "Accelerator type v6e-8 is not available in zone us-east1-d",
                                verb="create")
        start = time.monotonic()
        failed = mllm("vm", "create", "nope", "--zone", "us-east1-d", "--queued", "--poll", "0.2", "--timeout", "300",
                      cwd=tmp_path, env=env)
        assert time.monotonic() - start < 30
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
            "error: queueing TPU VM nope in us-east1-d failed: INVALID_ARGUMENT: Accelerator type v6e-8 is not "
            "available in zone us-east1-d"), failed.stderr


def test_list_all_zones(tmp_path):
    with FakeTpuApi(op_delay=0.1) as api:
        env = launcher_env(tmp_path, api.endpoint)
        for name, zone in (("east", "us-east1-d"), ("west", "europe-west4-a")):
            assert mllm("vm", "create", name, "--zone", zone, cwd=tmp_path, env=env).returncode == 0
        rows = json.loads(mllm("vm", "list", "--all-zones", "--json", cwd=tmp_path, env=env).stdout)
        assert sorted((r["name"], r["zone"]) for r in rows) == [("east", "us-east1-d"), ("west", "europe-west4-a")]


def test_help_renders_literally(tmp_path):
    out = mllm("logs", "--help", cwd=tmp_path, env=launcher_env(tmp_path, "http://127.0.0.1:9"))
    assert "`[wK]`-prefixed" in out.stdout
