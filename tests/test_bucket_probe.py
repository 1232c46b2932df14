"""`mllm launch --bucket` proves the bucket writable from worker 0 first, with the job's own
credentials and env file: `python -m mllm_jax bucket-probe` writes, reads back and deletes one
object and answers in one JSON line. A bucket the VM cannot write is refused in one line (exit 2)
before anything starts on any worker, not after compute. The subcommand against the GCS-protocol
server, the launcher's reading of its answer, and the whole launch through the real `mllm` CLI,
the Cloud TPU REST server and sshd workers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import REPO, SMOKE, free_port, launcher_env, mllm
from harness.tpu_slice import ZONE, Slice
from launcher.errors import LauncherError
from launcher.remote import probe_bucket
from mllm_jax.contracts import BUCKET_PROBE_PREFIX

DENIED = "Permission 'storage.objects.create' denied on resource (or it may not exist)."


def bucket_probe(url: str, env: dict[str, str], *args: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "mllm_jax", "bucket-probe", url, *args], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    return out.returncode, json.loads(lines[0])


def test_bucket_probe_writes_reads_and_deletes_or_says_why_not(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./.env here
    env_file = tmp_path / "gcs.env"  # the emulator's settings reach the probe only through the env file
    env_file.write_text("".join(f"{k}={v}\n" for k, v in gcs.env.items()))
    url = f"gs://{gcs.bucket}/team/a"

    gcs.deny_writes("someone-else@p.iam.gserviceaccount.com")  # another caller's denial is not ours
    assert bucket_probe(url, {}, "--env-file", str(env_file)) == (0, {"ok": True, "status": None, "error": ""})
    assert gcs.requests["POST"] == 1 and gcs.requests["DELETE"] == 1 and gcs.objects() == []

    gcs.deny_writes()
    code, answer = bucket_probe(url, {}, "--env-file", str(env_file))
    assert code == 1 and answer["ok"] is False and answer["status"] == 403, answer
    assert answer["error"].startswith(f"write {url}/{BUCKET_PROBE_PREFIX}") and DENIED in answer["error"], answer
    assert gcs.objects() == []

    gcs.allow_writes()
    assert bucket_probe(url, {}, "--env-file", str(env_file))[0] == 0 and gcs.objects() == []


def test_bucket_probe_is_bounded_in_time():
    """No GCS there: gcsfs retries with backoff for half a minute; the probe answers at its limit."""
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    code = "import sys; from mllm_jax.bucket_probe import main; sys.exit(main('gs://b', None, timeout=2))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout) == {"ok": False, "status": None,
                                      "error": "no answer from GCS in 2s (gcsfs retries a failing call)"}


@dataclass
class Answers:
    """A target whose shell answers with `out` (what a worker could say back)."""

    out: str
    code: int = 1
    index: int = 0
    label: str = "w0"
    repo: str = '"$HOME"/mllm-jax'
    python: str = "python3"

    def sh(self, script: str, stdin: str | None = None) -> tuple[int, str]:
        self.script = script
        return self.code, self.out


def test_the_launcher_turns_any_answer_into_one_line():
    error = f"write gs://b/.mllm-probe-1: x@y does not have storage.objects.create access to the object. {DENIED}"
    denied = json.dumps({"ok": False, "status": 403, "error": error})
    t = Answers("a warning first\n" + denied)
    with pytest.raises(LauncherError) as e:
        probe_bucket(t, "gs://b", "/root/.env", None)
    assert str(e.value) == ("--bucket gs://b: worker 0 cannot write it as the VM's default compute service account "
                            "(403: permission storage.objects.create denied); grant it roles/storage.objectUser on "
                            "the bucket, or create the VM with --service-account")
    assert t.script.endswith("-m mllm_jax bucket-probe gs://b --env-file /root/.env")
    with pytest.raises(LauncherError, match=r"as trainer@p\.iam\.gserviceaccount\.com \(403: "):
        probe_bucket(t, "gs://b", None, "trainer@p.iam.gserviceaccount.com")
    for garbage in ("Traceback (most recent call last):\n  ...\nImportError: \x1b[31mno gcsfs", "", "{not json", "[1]"):
        with pytest.raises(LauncherError) as e:
            probe_bucket(Answers(garbage, code=2), "gs://b", None, None)
        line = str(e.value)
        assert line.startswith("--bucket gs://b: worker 0 could not check that it can write there (bucket-probe "
                               "exited 2: ") and "\n" not in line and "\x1b" not in line, line
    probe_bucket(Answers('{"ok": true, "status": null, "error": ""}', code=0), "gs://b", None, None)



@pytest.fixture()
def repo(tmp_path):
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


@pytest.mark.e2e  # real sshd workers
def test_launch_refuses_a_bucket_worker_0_cannot_write_and_starts_nothing(tmp_path, hosts, repo, bucket, gcs):
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        assert run("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        secrets = tmp_path / "gcs.env"  # the workers' way to the bucket, as a user's .env would hold credentials
        secrets.write_text("".join(f"{k}={v}\n" for k, v in gcs.env.items()))
        assert run("env", "push", "--src", str(secrets)).returncode == 0
        url = f"gs://{gcs.bucket}/team"
        launch = ("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), "--set", "train.max_steps=1000",
                  "--set", f"data.path={bucket / 'input.txt'}", "--bucket", url)

        gcs.deny_writes()
        refused = run(*launch)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr == (f"error: --bucket {url}: worker 0 cannot write it as the VM's default compute "
                                  "service account (403: permission storage.objects.create denied); grant it "
                                  "roles/storage.objectUser on the bucket, or create the VM with --service-account\n")
        assert "started" not in refused.stdout
        nothing = run("exec", "--", "sh", "-c", "test ! -e mllm-jax/runs")  # no run dir, no pid file, anywhere
        assert nothing.returncode == 0, nothing.stdout + nothing.stderr

        gcs.allow_writes()
        launched = run(*launch)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert f"[w0] {url} is writable from here" in launched.stdout
        assert launched.stdout.count("started nanogpt-") == 2, launched.stdout
        assert not gcs.objects(f"team/{BUCKET_PROBE_PREFIX}")  # the probe cleaned up after itself
        assert run("stop", "--grace", "5").returncode == 0
