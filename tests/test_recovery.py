"""End-to-end: a spot run that survives preemption unattended. `mllm watch RUN --detach` runs the
recovery supervisor in the background; the harness preempts the node (every sshd host of it
killed, their disks lost, state PREEMPTED; through a queued resource, SUSPENDED); the
supervisor deletes it, creates it again, bootstraps, syncs the run's commit, pushes the env file
again and resumes from the last checkpoint, which sits on storage that outlives the VM: a bucket
on the GCS-protocol server (`mllm launch --bucket`), or a directory every host shares.
Per-step losses equal an uninterrupted run's; nothing is left in the API after the run ends or
recovery gives up. All through the real `mllm` CLI, the Cloud TPU REST server, the GCS server
and sshd workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MLLM, REPO, SHAKESPEARE, SMOKE, launcher_env, losses, mllm, run_hosts
from harness.gcs import GcsServer
from harness.tpu_slice import ZONE, Slice
from launcher.watch import CREATE_ATTEMPTS

pytestmark = pytest.mark.e2e  # real sshd workers

STEPS = 40
SETS = ["--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1", "--set", "train.eval_every=20",
        "--set", "train.checkpoint_every=10", "--set", "model.dropout=0.1", "--set", "sample.max_new_tokens=0"]
FAST = ["--poll", "0.5", "--unreachable-after", "20", "--backoff", "0.5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tests' config run uninterrupted on two processes, as the recovered runs are."""
    out = tmp_path_factory.mktemp("reference")
    procs = run_hosts("--config", str(SMOKE), *SETS, "--set", f"data.path={SHAKESPEARE}",
                      "--set", f"train.checkpoint_dir={out / 'ckpt'}", "--set", f"output_dir={out / 'run'}",
                      cwd=out, devices=1)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    return out / "run"


@pytest.fixture()
def repo(tmp_path):
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def sets(bucket: Path) -> list[str]:
    return [*SETS, "--set", f"data.path={bucket / 'input.txt'}"]


def wait_for(what: str, predicate, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def supervisor_pid(out: subprocess.CompletedProcess) -> int:
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("(pid ")[1].split(")")[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def checkpoints(bucket: Path) -> list[int]:
    return sorted(int(p.name) for p in (bucket / "ckpt").glob("*") if p.name.isdigit())


def bucket_checkpoints(gcs: GcsServer, run_id: str) -> list[str]:
    """Complete checkpoints: orbax marks a step on a bucket with <step>/commit_success.txt."""
    return [n for n in gcs.objects(f"{run_id}/checkpoints/") if n.endswith("/commit_success.txt") and n.count("/") == 3]


def test_preempted_vm_is_recreated_and_the_run_resumes_bit_exactly(tmp_path, hosts, repo, bucket, gcs, reference):
    tpu = Slice(hosts)
    with tpu.api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        assert run("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        secrets = tmp_path / "gcs.env"  # the workers' way to the bucket, as a user's .env would hold credentials
        secrets.write_text("".join(f"{k}={v}\n" for k, v in gcs.env.items()))
        assert run("env", "push", "--src", str(secrets)).returncode == 0
        launched = run("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), *sets(bucket),
                       "--bucket", f"gs://{gcs.bucket}")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        run_id = launched.stdout.split("run ")[-1].split(":")[0]

        # The supervisor in the background; killed and started again, it picks the run up
        # (the same VM: no second one).
        first = supervisor_pid(run("watch", run_id, "--detach", "--push-env", str(secrets), *FAST))
        again = run("watch", run_id, "--detach", *FAST)
        assert again.returncode == 2 and f"run {run_id} is already watched (pid {first}" in again.stderr, again.stderr
        os.kill(first, signal.SIGKILL)
        wait_for("the killed supervisor to go", lambda: not alive(first), 10)
        pid = supervisor_pid(run("watch", run_id, "--detach", *FAST))

        wait_for("a checkpoint on the bucket", lambda: bucket_checkpoints(gcs, run_id))
        assert len(api.nodes) == 1
        # One bad minute of the API: three 503s in a row are ridden out, not the end of the supervision.
        api.fail_next(503, "The service is currently unavailable.", method="GET", times=3)
        wait_for("the supervisor to meet the 503s", lambda: not api.pending_failures, 30)
        tpu.preempt("pair")
        # Killed in the middle of its recovery and started again, it counts one preemption once.
        log_file = repo / ".mllm" / "watch" / f"{run_id}.log"
        wait_for("the recreate", lambda: "creating pair again" in log_file.read_text(), 120)
        os.kill(pid, signal.SIGKILL)
        wait_for("the killed supervisor to go", lambda: not alive(pid), 10)
        pid = supervisor_pid(run("watch", run_id, "--detach", *FAST))
        wait_for("the supervisor to finish", lambda: not alive(pid), 300)
        log = log_file.read_text()
        assert "the VM is PREEMPTED: recovery 1/3" in log and "creating pair again (v4-16, spot)" in log, log
        assert f"resumed {run_id}" in log and f"{run_id} completed after 1 recoveries" in log, log
        assert f"pushed {secrets} (4 keys) to the workers" in log, log

        summary = json.loads((repo / "runs" / run_id / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["final_step"] == STEPS and summary["recoveries"] == 1
        assert summary["checkpoint_dir"] == f"gs://{gcs.bucket}/{run_id}/checkpoints" and summary["process_count"] == 2
        got, want = losses(repo / "runs" / run_id), losses(reference)
        assert sorted(got) == list(range(1, STEPS + 1)) and got == want, "per-step losses must equal the uninterrupted run's"
        assert losses(repo / "runs" / run_id, "eval/loss") == losses(reference, "eval/loss")
        (entry,) = json.loads(run("runs", "--json").stdout)
        assert entry["run"] == run_id and entry["recoveries"] == 1 and entry["status"] == "completed"
        assert "recoveries" in run("runs").stdout
        assert not api.nodes and not api.queued_resources  # the finished run's VM is deleted


def test_suspended_queued_resource_is_recreated_and_the_run_completes_bit_exactly(tmp_path, hosts, repo, bucket,
                                                                                  reference):
    """Through a queued resource, on a directory every host shares: a job killed on a live VM
    (status lost) is resumed in place; one that dies by itself only with --restart-on-failure;
    the suspended queued resource is queued again, waits past the create timeout keeping its
    place, meets a stockout and is created again; the run completes with the uninterrupted run's
    losses; its VM and queued resource are deleted."""
    tpu = Slice(hosts)
    with tpu.api as api:
        env = launcher_env(tmp_path, api.endpoint, MLLM_WATCH_CREATE_TIMEOUT="2")
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        created = run("vm", "create", "q", "--queued", "--spot", "--zone", ZONE, "--type", "v4-16", "--poll", "0.2")
        assert created.returncode == 0, created.stderr
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        assert run("exec", "--", "rm", "-f", "/root/.env").returncode == 0  # what the supervisor of a test before pushed
        # The job killed on a live VM (as the OOM killer would): no exit file, status `lost`. Each
        # worker kills its own job itself, the moment the first checkpoint is complete (orbax
        # renames its directory to the step) or the next save begins. The killer starts before the
        # launch: a step takes milliseconds, so one sent after seeing the checkpoint, or even after
        # the launch returned, could come after the run's end. (This module's tests run one at a
        # time: the only live job on these workers is this one.)
        ckpt = bucket / "ckpt"
        kill = (f'i=0; until [ -d {ckpt}/10 ] || ls {ckpt} 2>/dev/null | grep -q "^[2-4]0" || [ $i -gt 20000 ]; '
                'do sleep 0.005; i=$((i+1)); done; '
                'for f in ~/mllm-jax/runs/*/worker-*.pid; do case "$f" in */latest/*) continue;; esac; '
                'kill -0 "-$(cat "$f")" 2>/dev/null || continue; '
                'kill -9 "-$(cat "$f")" && echo "killed $f"; done')
        killer = subprocess.Popen([MLLM, "exec", "--", "sh", "-c", kill], cwd=repo, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        launched = run("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), *sets(bucket),
                       "--set", f"train.checkpoint_dir={bucket / 'ckpt'}")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        run_id = launched.stdout.split("run ")[-1].split(":")[0]
        try:
            killed, _ = killer.communicate(timeout=300)
        finally:
            killer.kill()
        assert killer.returncode == 0 and killed.count(f"killed /root/mllm-jax/runs/{run_id}/") == 2, killed
        states = lambda: [w["state"] for w in json.loads(run("status", "--json").stdout)["workers"]]  # noqa: E731
        assert states() == ["lost", "lost"]
        # Room for one more restart than the test makes: under CI's load a 2-process CPU job can miss
        # gloo's 30 s collective timeout (exit 134); --restart-on-failure resumes it like the others.
        pid = supervisor_pid(run("watch", run_id, "--detach", "--max-recoveries", "5", "--restart-on-failure", *FAST))
        log = repo / ".mllm" / "watch" / f"{run_id}.log"
        resumed = lambda n: log.read_text().count(f"resumed {run_id}") >= n  # noqa: E731
        wait_for("the job resumed in place", lambda: resumed(1), 120)
        assert "the job is gone without an exit code: recovery 1/5" in log.read_text()
        assert "creating" not in log.read_text() and len(api.nodes) == 1  # the same VM

        # The trainer dies by itself (exit 137): a failure, resumed only because of --restart-on-failure.
        wait_for("the resumed job to run", lambda: states() == ["running", "running"], 60)
        assert run("exec", "--", "pkill", "-9", "-f", "[m]llm_jax train").returncode == 0
        wait_for("the restarted job", lambda: resumed(2), 120)
        assert "the job exited 137 on w" in log.read_text() and ": recovery 2/5" in log.read_text()

        # A preemption through the queued resource; queued again, it waits past the create timeout
        # (and keeps its place: no second request), then meets a stockout, and is queued once more.
        api.fail_next_queued_resource()
        api.hold_queued("q")
        posts = lambda: sum(r.method == "POST" and r.path.endswith("/queuedResources") for r in api.requests)  # noqa: E731
        before = posts()
        tpu.preempt("q")
        wait_for("the queued resource to outwait the create timeout", lambda: log.read_text().count(
            "keeping its place in the queue") >= 2, 120)
        assert posts() == before + 1 and api.queued_resource("q")["state"]["state"] == "WAITING_FOR_RESOURCES"
        api.release_queued("q")
        wait_for("the supervisor to finish", lambda: not alive(pid), 300)
        text = log.read_text()
        assert "its queued resource is SUSPEND" in text and "creating q again (v4-16, spot, queued), attempt 1" in text
        assert "create failed: queued resource q in us-east1-d is FAILED" in text and "attempt 2" in text, text
        assert f"{run_id} completed after 2 recoveries and " in text, text

        summary = json.loads((repo / "runs" / run_id / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["final_step"] == STEPS and summary["recoveries"] == 2
        got, want = losses(repo / "runs" / run_id), losses(reference)
        assert sorted(got) == list(range(1, STEPS + 1)) and got == want, "per-step losses must equal the uninterrupted run's"
        assert not api.nodes and not api.queued_resources, (api.nodes, api.queued_resources)
        (entry,) = json.loads(run("runs", "--json").stdout)
        assert entry["status"] == "completed" and entry["recoveries"] == 2


def test_launch_recover_gives_up_on_silent_workers_and_stockouts_leaving_nothing(tmp_path, hosts, repo, bucket):
    """`mllm launch --recover` supervises in the foreground (timing from $MLLM_WATCH_*). The node's
    machines die while the API still says READY: only the workers' silence past the unreachable
    timeout tells. Creating it again (directly, no queued resource) meets a stockout at every
    try; the supervisor backs off, gives up, exits 1, and deletes what is left."""
    tpu = Slice(hosts)
    with tpu.api as api:
        env = {**launcher_env(tmp_path, api.endpoint), "MLLM_WATCH_POLL": "0.3", "MLLM_WATCH_UNREACHABLE_AFTER": "2",
               "MLLM_WATCH_BACKOFF": "0.05"}
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        assert run("vm", "create", "solo", "--zone", ZONE, "--type", "v6e-8").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        bad = mllm("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), "--recover", cwd=repo,
                   env={**env, "MLLM_WATCH_POLL": "soon"})
        assert bad.returncode == 2 and bad.stderr.strip().endswith("$MLLM_WATCH_POLL='soon': expected seconds "
                                                                   "(a number >= 0)"), bad.stderr
        listing = lambda: run("exec", "--", "ls", "-a", "mllm-jax/runs").stdout  # noqa: E731
        before = listing()
        disk = run("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), *sets(bucket), "--recover")
        assert disk.returncode == 2 and "on the VM's own disk, which a preemption loses" in disk.stderr, disk.stderr
        assert listing() == before and not disk.stdout  # refused before anything was synced or started
        out = tmp_path / "recover.out"
        with open(out, "w") as f:
            proc = subprocess.Popen([MLLM, "launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), *sets(bucket),
                                     "--set", "train.max_steps=100000", "--recover", "--max-recoveries", "1",
                                     "--allow-restart-from-zero"],
                                    cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for("the supervisor to watch", lambda: "recoveries used" in out.read_text(), 120)
            api.fail_next_operation(verb="create", times=CREATE_ATTEMPTS)
            tpu.preempt("solo", state=None)
            assert proc.wait(timeout=120) == 1, out.read_text()
        finally:
            proc.kill()
        text = out.read_text()
        assert re.search(r"the workers have been unreachable for \d+s \(.+\): recovery 1/1", text), text
        assert text.count("create failed: ") == CREATE_ATTEMPTS and "quota or capacity exhausted" in text, text
        assert "1 recoveries used up: giving up" in text and "gave up after 1 recoveries" in text, text
        assert not api.nodes and not api.queued_resources, (api.nodes, api.queued_resources)
        (entry,) = json.loads(run("runs", "--json").stdout)
        assert entry["status"] == "gave up" and entry["recoveries"] == 1


def watched_long_run(api, tmp_path, repo, bucket):
    """A VM "solo" that mllm made, a long nanoGPT run on it with its checkpoints on the shared
    dir, and that run's supervisor in the background: (the `mllm` caller, run id, supervisor pid)."""
    env = launcher_env(tmp_path, api.endpoint)
    run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
    assert run("vm", "create", "solo", "--zone", ZONE, "--type", "v6e-8").returncode == 0
    assert run("bootstrap", "--python", sys.executable).returncode == 0
    launched = run("launch", "nanogpt", "--config", str(SMOKE.relative_to(REPO)), *sets(bucket),
                   "--set", "train.max_steps=100000", "--set", f"train.checkpoint_dir={bucket / 'ckpt'}")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    run_id = launched.stdout.split("run ")[-1].split(":")[0]
    return run, run_id, supervisor_pid(run("watch", run_id, "--detach", *FAST))


def test_a_stopped_watched_run_keeps_its_vm_and_checkpoint(tmp_path, hosts, repo, bucket):
    """`mllm stop` of a watched run (exit 143: it checkpointed and can go on): the supervisor
    ends "stopped" and keeps the VM, although mllm made it, with the checkpoint on it."""
    tpu = Slice(hosts)
    with tpu.api as api:
        run, run_id, pid = watched_long_run(api, tmp_path, repo, bucket)
        wait_for("a checkpoint", lambda: checkpoints(bucket))
        assert run("stop").returncode == 0
        wait_for("the supervisor to finish", lambda: not alive(pid), 120)
        log = (repo / ".mllm" / "watch" / f"{run_id}.log").read_text()
        assert "keeping solo: the run was stopped and can go on from its checkpoint" in log, log
        assert f"{run_id} stopped after 0 recoveries" in log, log
        assert api.node("solo")["state"] == "READY" and checkpoints(bucket)


def test_a_relaunch_that_finds_no_checkpoint_fails_the_run_instead_of_starting_over(tmp_path, hosts, repo, bucket):
    """The supervisor saw the job report a complete checkpoint; the VM is preempted and the
    checkpoints are lost with it (here: deleted from the shared storage). The relaunch must
    resume (`--resume`, not "resume if any"): it finds nothing, and the run ends failed rather
    than training from step 0 and calling that a recovery."""
    tpu = Slice(hosts)
    with tpu.api as api:
        run, run_id, pid = watched_long_run(api, tmp_path, repo, bucket)
        plan = repo / ".mllm" / "watch" / f"{run_id}.json"
        seen = wait_for("the supervisor to see a checkpoint", lambda: json.loads(plan.read_text())["checkpoint"])
        assert seen in checkpoints(bucket)
        tpu.preempt("solo")
        shutil.rmtree(bucket / "ckpt")
        wait_for("the supervisor to finish", lambda: not alive(pid), 300)
        log = (repo / ".mllm" / "watch" / f"{run_id}.log").read_text()
        assert "the VM is PREEMPTED: recovery 1/3" in log and f"resumed {run_id}" not in log, log
        assert f"recovery 1 failed: checkpoint step {seen} was reported, but" in log and "has no complete checkpoint in" in log, log
        assert f"{run_id} failed after 1 recoveries" in log and "completed" not in log, log
        assert not checkpoints(bucket)  # nothing trained from step 0 into the run's checkpoint dir
        (entry,) = json.loads(run("runs", "--json").stdout)
        assert entry["status"] == "failed" and entry["recoveries"] == 1
        assert not api.nodes  # the failed run's VM, made by mllm, is deleted
