"""End-to-end: sync the user's exact commit, launch nanoGPT detached on 1 and 2 sshd "workers"
(two processes joined by jax.distributed across two hosts, each with its own filesystem), follow,
status, logs, stop and fetch-summary, all through the real `mllm` CLI."""

from __future__ import annotations

import json
import shlex
import signal
import shutil
import subprocess
import sys
import time

import pytest

from conftest import MLLM, REPO, SHAKESPEARE, launcher_env, losses, mllm
from harness.tpu_slice import ZONE, Slice

pytestmark = pytest.mark.e2e  # real sshd workers

# A config path and a branch name that a careless shell would execute.
WEIRD_CONFIG = "configs/it's a $(touch pwned-config) test.yaml"
WEIRD_BRANCH = "feature/it's-$(touch${IFS}pwned-ref)"  # git allows no spaces in branch names


@pytest.fixture()
def repo(tmp_path, bucket):
    """The user's checkout: a clone of this project plus one committed config with a nasty name."""
    clone = tmp_path / "my checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    git = lambda *a: subprocess.run(["git", "-C", str(clone), *a], check=True, capture_output=True)  # noqa: E731
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    smoke = (REPO / "configs" / "nanogpt" / "cpu_smoke.yaml").read_text()
    (clone / WEIRD_CONFIG).write_text(smoke + f"data:\n  path: {bucket / 'input.txt'}\n")
    git("add", "-A")
    git("commit", "-qm", "weird config")
    git("branch", WEIRD_BRANCH)
    return clone


def head(repo) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_launch_on_two_workers(tmp_path, hosts, repo, bucket):
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a, **kw: mllm(*a, cwd=repo, env=env, timeout=300, **kw)  # noqa: E731

        # Two workers: one process each, joined through worker 0's coordinator.
        assert run("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        bad = run("sync", "--ref", "main $(touch pwned-badref)")
        assert bad.returncode == 2 and bad.stderr.startswith("error: --ref main $(touch pwned-badref): not a commit")
        synced = run("sync", "--ref", WEIRD_BRANCH)
        assert synced.returncode == 0, synced.stderr
        assert sorted(line.split()[1] for line in synced.stdout.splitlines()) == [head(repo)[:12]] * 2
        assert synced.stdout.count("(full, ") == 2  # the first sync ships everything
        # A laptop-relative path out of the repository means nothing on the workers: refused here.
        (tmp_path / "shared" / "data").mkdir(parents=True)
        shutil.copy(bucket / "input.txt", tmp_path / "shared" / "data" / "input.txt")  # it is there on the laptop
        outside = run("launch", "nanogpt", "--config", WEIRD_CONFIG, "--set", "data.path=../shared/data/input.txt")
        assert outside.returncode == 2 and outside.stderr == (
            "error: data.path '../shared/data/input.txt': a relative path outside the repository, which is not "
            "synced to the workers (they run in their copy of it); give the path on the workers as an absolute "
            "one, or put the file under the repository\n"), outside.stderr
        assert "runs" not in run("exec", "--", "ls", "mllm-jax").stdout  # nothing started there
        api.fail_next(503, "The service is currently unavailable.", method="GET", times=3)  # a bad minute
        two = run("launch", "nanogpt", "--config", WEIRD_CONFIG, "--set", "train.max_steps=20",
                  "--set", f"train.checkpoint_dir={bucket}/ckpt", "--follow")
        assert two.returncode == 0, two.stdout + two.stderr
        assert api.pending_failures == 0
        assert "[w0] step 20/20" in two.stdout and "[w1] step 20/20" not in two.stdout  # only process 0 logs steps
        status = json.loads(run("status", "--json").stdout)
        assert [(w["worker"], w["state"], w["last_step"]) for w in status["workers"]] == [(0, "exited 0", 20), (1, "exited 0", None)]
        logs = run("logs", "--worker", "all")
        assert "[w0] eval step 20: eval/loss" in logs.stdout and "[w1]" in logs.stdout
        fetched = run("fetch-summary", "--dest", str(tmp_path / "results"))
        assert fetched.returncode == 0, fetched.stderr
        run_id = fetched.stdout.split(":")[0]
        summary = json.loads((tmp_path / "results" / run_id / "run_summary.json").read_text())
        assert summary["git"]["commit"] == head(repo) and summary["git"]["dirty"] is False
        assert summary["process_count"] == 2 and summary["device_count"] == 2 and summary["status"] == "completed"
        assert (tmp_path / "results" / run_id / "metrics.jsonl").is_file()
        assert summary["checkpoint_dir"] == f"{bucket}/ckpt" and (bucket / "ckpt" / "20").is_dir()
        index = json.loads(run("runs", "--json").stdout)
        assert [e["vm"] for e in index] == ["pair"]
        assert run("vm", "delete", "--yes").returncode == 0

    assert not list(repo.glob("pwned*")) and not list(tmp_path.glob("pwned*"))


def test_killing_the_client_leaves_the_job_running_until_stop(tmp_path, hosts, repo):
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        assert run("vm", "create", "long", "--zone", ZONE, "--type", "v6e-8").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        follower = subprocess.Popen(
            [MLLM, "launch", "nanogpt", "--config", WEIRD_CONFIG, "--set", "train.max_steps=100000",
             "--set", "train.log_every=5", "--follow"], cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        for line in follower.stdout:
            if "step 10/" in line or time.time() > deadline:
                break
        follower.send_signal(signal.SIGKILL)  # the laptop goes away mid-follow
        follower.wait()
        status = json.loads(run("status", "--json").stdout)
        assert status["workers"][0]["state"] == "running"
        again = run("launch", "nanogpt", "--config", WEIRD_CONFIG)
        assert again.returncode == 2 and "a job is still running there" in again.stderr
        stopped = run("stop")
        assert stopped.returncode == 0 and "stopped (exit 143)" in stopped.stdout, stopped.stdout
        status = json.loads(run("status", "--json").stdout)
        assert status["workers"][0]["state"] == "exited 143"
        summary = json.loads((run("fetch-summary") and (repo / "runs" / status["run"] / "run_summary.json")).read_text())
        assert summary["status"] == "stopped" and summary["latest_checkpoint_step"] == summary["final_step"]
        assert run("vm", "delete", "--yes").returncode == 0


def test_launch_resume_continues_the_same_run_bit_exactly(tmp_path):
    """`mllm launch --resume latest` continues the run from its last checkpoint under the same
    run id: metrics.jsonl goes on from there, and every step's loss equals an uninterrupted run's.
    A run that is not there, or has no checkpoint, is refused in one line before anything starts."""
    env = {k: v for k, v in launcher_env(tmp_path, "http://127.0.0.1:9").items() if k != "MLLM_TPU_API_ENDPOINT"}
    args = ["nanogpt", "--local", "--config", str(REPO / "configs" / "nanogpt" / "cpu_smoke.yaml"),
            "--set", f"data.path={SHAKESPEARE}", "--set", "train.lr_decay_steps=20", "--set", "train.log_every=1",
            "--set", "sample.max_new_tokens=0", "--follow"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for d in (whole, part):
        d.mkdir()
    run_id = lambda d: json.loads(mllm("status", "--local", "--json", cwd=d, env=env).stdout)["run"]  # noqa: E731
    assert mllm("launch", *args, "--set", "train.max_steps=20", cwd=whole, env=env).returncode == 0
    assert mllm("launch", *args, "--set", "train.max_steps=10", cwd=part, env=env).returncode == 0
    first = run_id(part)
    resumed = mllm("launch", *args, "--set", "train.max_steps=20", "--resume", "latest", cwd=part, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"started {first}" in resumed.stdout and "resumed from step 10" in resumed.stdout
    assert run_id(part) == first and len(list((part / "runs").glob("nanogpt-*"))) == 1
    got, want = losses(part / "runs" / first), losses(whole / "runs" / run_id(whole))
    assert sorted(got) == list(range(1, 21)) and got == want
    summary = json.loads((part / "runs" / first / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 20
    log = (part / "runs" / first / "logs" / "worker-0.log").read_text()
    assert "step 10/10" in log and "step 20/20" in log, "the log is appended to"

    (part / "runs" / "nanogpt-20990101-000000-abcdef0").mkdir()  # a run dir without checkpoints
    for name, want in [("nanogpt-20990101-000000-abcdef0", "has no complete checkpoint in runs/nanogpt-"),
                       ("nanogpt-20990102-000000-abcdef0", "no run nanogpt-20990102-000000-abcdef0")]:
        out = mllm("launch", *args, "--resume", name, cwd=part, env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and want in out.stderr, out.stderr
    assert run_id(part) == first


def test_local_launch_needs_no_cloud(tmp_path):
    """The README's main job, its exact line, in a checkout next to the shared data (as here)."""
    line = next(t for t in (REPO / "README.md").read_text().splitlines() if t.startswith("mllm launch nanogpt --local"))
    work = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    (tmp_path / "shared").symlink_to(SHAKESPEARE.parents[2])
    env = {k: v for k, v in launcher_env(tmp_path, "http://127.0.0.1:9").items() if k != "MLLM_TPU_API_ENDPOINT"}
    out = mllm(*shlex.split(line)[1:], cwd=work, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[local] step 40/40" in out.stdout
    status = json.loads(mllm("status", "--local", "--json", cwd=work, env=env).stdout)
    assert status["workers"][0]["state"] == "exited 0"
    fetched = mllm("fetch-summary", "--local", cwd=work, env=env)
    assert fetched.returncode == 0 and "completed at step 40" in fetched.stdout
    assert (work / "runs" / status["run"] / "logs" / "worker-0.log").is_file()
