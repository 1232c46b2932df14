"""`mllm vm ...` against a local Cloud TPU v2 REST server, through the real google-cloud-tpu client."""

from __future__ import annotations

import json
import stat

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
    assert dry.returncode == 0 and json.loads(dry.stdout)["version"] == "v6e-ubuntu-2404" and not api.nodes

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
    gone = mllm("vm", "delete", "--preempted", "--yes", cwd=tmp_path, env=env)
    assert gone.returncode == 0 and f"deleted {auto_name}" in gone.stdout
    deleted = mllm("vm", "delete", "--vm", "demo", "--yes", cwd=tmp_path, env=env)
    assert deleted.returncode == 0 and not api.nodes


@pytest.mark.parametrize(
    "args, message",
    [
        (["vm", "create", "x", "--zone", "us-east1-d", "--type", "v9-8"], "error: --type 'v9-8': expected <generation>-<cores>"),
        (["vm", "create", "x", "--zone", "useast1", "--type", "v6e-8"], "error: --zone 'useast1': expected a zone such as us-east1-d"),
        (["vm", "describe", "--vm", "nope", "--zone", "us-east1-d"], "error: TPU VM nope in us-east1-d: not found"),
        (["vm", "delete", "--vm", "nope", "--zone", "us-east1-d", "--yes"], "error: TPU VM nope in us-east1-d: not found"),
        (["env", "push", "--src", "missing.env", "--vm", "x", "--zone", "us-east1-d"], "error: --src missing.env: env file not found"),
        (["vm", "describe", "--zone", "us-east1-d"], "error: --vm is required"),
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
