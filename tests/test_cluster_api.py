"""The launcher as a library, no CLI: create a 2-worker VM, bootstrap, launch nanoGPT on both
workers, wait, status, logs, fetch-summary and delete, through `launcher.cloud` and
`launcher.cluster` alone, as a supervisor or a regression suite drives them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE
from harness.tpu_slice import ZONE, Slice
from launcher import cloud, keys, remote
from launcher.cluster import Cluster

pytestmark = pytest.mark.e2e  # real sshd workers


def test_two_worker_run_through_the_python_api(tmp_path, hosts, monkeypatch, capsys):
    data = Path(tempfile.mkdtemp(prefix="mllm-bucket-", dir="/srv"))  # storage every worker sees
    try:
        shutil.copy(SHAKESPEARE, data / "input.txt")
        repo = tmp_path / "checkout"
        subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
        with Slice(hosts).api as api:
            monkeypatch.setenv(cloud.ENV_ENDPOINT, api.endpoint)
            monkeypatch.setenv("MLLM_PROJECT", "test-project")
            monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
            monkeypatch.chdir(repo)
            z = cloud.Zone("test-project", ZONE, cloud.make_client())
            req = cloud.VmRequest.checked("api", "v4-16", "auto", True, False, False, None, None)
            assert z.create_vm(req, keys.ensure_key()[1], timeout=60, poll=0.1).state.name == "READY"

            with Cluster.connect("api", zone=ZONE) as c:
                assert [w.host for w in c.selected] == hosts.ips
                assert {r["state"] for r in c.bootstrap(remote.InstallOptions(), python=sys.executable).values()} == {"existing"}
                run = c.launch("nanogpt", "configs/nanogpt/cpu_smoke.yaml",
                               ["train.max_steps=20", f"data.path={data / 'input.txt'}",
                                f"train.checkpoint_dir={data / 'ckpt'}"],
                               run_preflight=False)  # test_preflight.py covers the gate
                assert run.wait() == 0
                status = run.status()
                assert [(s.worker, s.state) for s in status.values()] == [(0, "exited 0"), (1, "exited 0")]
                assert status[0].last_step == 20
                capsys.readouterr()
                c.run().logs()  # runs/latest is this run
                logged = capsys.readouterr().out
                assert "[w0] step 20/20" in logged and "[w1]" in logged
                summary, entry = run.fetch_summary(tmp_path / "results")
            assert summary["status"] == "completed" and summary["process_count"] == 2
            assert entry["vm"] == "api" and (tmp_path / "results" / run.id / "run_summary.json").is_file()
            cloud.deletion(z, "api").run(60)
            assert not api.nodes
    finally:
        shutil.rmtree(data, ignore_errors=True)
