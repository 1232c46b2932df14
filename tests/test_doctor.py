"""`mllm doctor` through the real console script, against the local Cloud TPU (and Compute Engine)
REST server and the GCS server: a healthy project is all ✓, and each broken piece is its own line
that says what to do."""

from __future__ import annotations

import os

import pytest

from conftest import launcher_env, mllm
from harness.tpu_api import FakeTpuApi
from launcher import doctor
from launcher.errors import LauncherError

ZONE = "us-east1-d"
SECRET = "wandb-secret-value-0123456789"


@pytest.fixture()
def api():
    with FakeTpuApi(op_delay=0.1) as server:
        yield server


def _lines(out: str) -> dict[str, str]:
    """Check name -> its whole line."""
    return {line[2:].split(": ", 1)[0]: line for line in out.splitlines()}


def test_healthy_then_each_piece_broken(tmp_path, api, gcs):
    env = launcher_env(tmp_path, api.endpoint, MLLM_COMPUTE_API_ENDPOINT=api.endpoint, **gcs.env)
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    args = ("doctor", "--zone", ZONE, "--type", "v6e-8", "--bucket", f"gs://{gcs.bucket}/ckpt")

    healthy = mllm(*args, cwd=tmp_path, env=env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    lines = _lines(healthy.stdout)
    assert list(lines) == ["credentials", "project", "Cloud TPU API", "accelerator type v6e-8", "runtime version",
                           "OS Login", "SSH key", f"bucket gs://{gcs.bucket}/ckpt", "W&B"]
    assert all(line.startswith("✓ ") for line in lines.values()), healthy.stdout
    assert f"anonymous (MLLM_TPU_API_ENDPOINT={api.endpoint})" in lines["credentials"]
    assert "default runtime for v6e: v6e-ubuntu-2404" in lines["runtime version"]
    assert SECRET not in healthy.stdout + healthy.stderr
    assert gcs.objects() == []  # the probe cleaned up after itself

    api.offer(ZONE, types=["v5litepod-8", "v4-8"])
    api.set_project_metadata("test-project", "enable-oslogin", "TRUE")
    gcs.deny_writes()
    (tmp_path / ".env").write_text("OTHER=1\n")
    key = tmp_path / "config" / "mllm" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("not really a key\n")
    key.chmod(0o644)
    key.with_suffix(".pub").write_text("ssh-ed25519 AAAA mllm\n")

    broken = mllm(*args, cwd=tmp_path, env=env)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    lines = _lines(broken.stdout)
    assert lines["accelerator type v6e-8"] == (f"✗ accelerator type v6e-8: not offered in {ZONE} "
                                               "(offered: v4-8, v5litepod-8); pick another --zone or --type")
    assert lines["runtime version"].startswith("✓ ")
    assert lines["OS Login"].startswith("! OS Login: on for project test-project (enable-oslogin=TRUE); ")
    assert "opt out (enable-oslogin=FALSE)" in lines["OS Login"] and "--os-login" in lines["OS Login"]
    bucket = lines[f"bucket gs://{gcs.bucket}/ckpt"]
    assert bucket.startswith(f"✗ bucket gs://{gcs.bucket}/ckpt: no write permission (")
    assert "storage.objects.create" in bucket and "roles/storage.objectUser" in bucket
    assert lines["SSH key"] == f"✗ SSH key: {key} has mode 0644 (ssh refuses a key others can read); chmod 600 {key}"
    assert lines["W&B"].startswith("! W&B: no WANDB_API_KEY in .env; runs log to W&B offline")
    assert "Traceback" not in broken.stderr


def test_no_credentials_stops_before_any_api(tmp_path):
    """No MLLM_TPU_API_ENDPOINT and no ADC: one ✗ with the fix, the API checks skipped, and any
    request that did go out would meet a closed port (the proxies and the metadata server)."""
    empty = tmp_path / "home"
    empty.mkdir()
    env = launcher_env(tmp_path, "unused", GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"),
                       HOME=str(empty), CLOUDSDK_CONFIG=str(empty), HTTPS_PROXY="http://127.0.0.1:9",
                       HTTP_PROXY="http://127.0.0.1:9", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    del env["MLLM_TPU_API_ENDPOINT"]
    out = mllm("doctor", "--zone", ZONE, "--bucket", "gs://some-bucket", cwd=tmp_path, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    lines = _lines(out.stdout)
    assert lines["credentials"].startswith("✗ credentials: none found (")
    assert lines["credentials"].endswith("; run `gcloud auth application-default login` or set "
                                         "GOOGLE_APPLICATION_CREDENTIALS")
    assert lines["project"] == "✓ project: test-project"
    for name in ("Cloud TPU API", "accelerator type v6e-8", "runtime version", "OS Login", "bucket gs://some-bucket"):
        assert lines[name] == f"- {name}: skipped (needs credentials)"
    assert lines["SSH key"].startswith("✓ SSH key: none yet")


def test_warnings_pass_and_bad_input_raises(tmp_path, api, monkeypatch):
    """The library call itself: warnings (OS Login on, no .env) do not fail a launch; malformed
    input is a LauncherError (the CLI's one line, exit 2) before anything is checked."""
    env = launcher_env(tmp_path, api.endpoint, MLLM_COMPUTE_API_ENDPOINT=api.endpoint)
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    api.set_project_metadata("test-project", "enable-oslogin", "true")
    checks = doctor.run_checks(ZONE, None, "v5litepod-16", "auto")
    assert all(c.ok for c in checks)
    assert [c.name for c in checks if c.mark is doctor.Mark.WARN] == ["OS Login", "W&B"]
    assert "default runtime for v5litepod: v2-alpha-tpuv5-lite" in checks[4].detail
    requests = len(api.requests)
    for bad in ({"zone": "us-east1"}, {"accelerator_type": "v7-8"}, {"bucket": "s3://b"}):
        with pytest.raises(LauncherError):
            doctor.run_checks(**{"zone": ZONE, "project": None, **bad})
    assert len(api.requests) == requests


def test_compute_os_login(api, monkeypatch):
    """launcher.compute: the node's enable-oslogin wins over the project's; a transient error is
    retried, a refusal is one LauncherError line."""
    from launcher import compute

    monkeypatch.setenv(compute.ENV_ENDPOINT, api.endpoint)
    assert compute.project_metadata("test-project") == {} and not compute.os_login_in_force("test-project")
    api.set_project_metadata("test-project", "enable-oslogin", "True")
    api.fail_next(503, "backend unavailable")
    assert compute.os_login_in_force("test-project")
    assert not compute.os_login_in_force("test-project", {"enable-oslogin": "FALSE"})
    api.fail_next(403, "Required 'compute.projects.get' permission for 'projects/test-project'")
    with pytest.raises(LauncherError, match=r"permission denied \(Required 'compute.projects.get'"):
        compute.project_metadata("test-project")
