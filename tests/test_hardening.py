"""Issue 16's findings, each through real processes: the `mllm` CLI and the trainer as a hostile
or careless user drives them, on this machine (`--local`) and on sshd workers. Each test failed
on the code before the fix."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import MLLM, REPO, SHAKESPEARE, SMOKE, free_port, launcher_env, mllm, run_trainer, trainer_cmd, trainer_env
from harness.tpu_slice import ZONE, Slice
from launcher import jobs

PWNED = ("/tmp/pwned", "/tmp/pwned2")
LONG = ["--set", "train.max_steps=100000", "--set", "train.log_every=2500"]


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under root, with a hash of each file's bytes."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
                                       else os.readlink(p) if p.is_symlink() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture()
def checkout(tmp_path):
    """The user's checkout: a clone of this project with the shared data copied to where every
    sshd worker sees it (/srv; a worker's /tmp and /root are its own)."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    data = Path(tempfile.mkdtemp(prefix="mllm-data-", dir="/srv"))
    shutil.copy(SHAKESPEARE, data / "input.txt")
    for p in PWNED:
        Path(p).unlink(missing_ok=True)
    yield clone, ["--set", f"data.path={data / 'input.txt'}"]
    shutil.rmtree(data, ignore_errors=True)
    for p in PWNED:
        Path(p).unlink(missing_ok=True)


def no_pwned_on_laptop() -> None:
    assert not [p for p in PWNED if Path(p).exists()]


# -- on this machine --------------------------------------------------------------------------------

def test_recipe_and_set_items_never_run_as_shell_locally(tmp_path, checkout):
    repo, data = checkout
    env = launcher_env(tmp_path, "http://127.0.0.1:9")
    before = tree(repo)
    evil_sets = f"wandb.name=x\nMLLM_JOB_EOF\ntouch {PWNED[0]}\nexit 0\n"
    for argv in (["nanogpt$(touch /tmp/pwned)"], ["nanogpt;touch /tmp/pwned;"],
                 ["nanogpt", "--set", evil_sets], ["nanogpt", "--set", "train.max_step=1"]):
        out = mllm("launch", *argv, "--local", "--config", str(SMOKE), *data, cwd=repo, env=env)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "unknown config key train.max_step; did you mean train.max_steps?" in out.stderr  # found on the laptop
    time.sleep(1)
    no_pwned_on_laptop()
    assert tree(repo) == before  # nothing started, no run dir


def test_a_killed_wrapper_orphans_nothing_and_two_launches_start_one_job(tmp_path, checkout):
    repo, data = checkout
    env = launcher_env(tmp_path, "http://127.0.0.1:9")
    launch = [MLLM, "launch", "nanogpt", "--local", "--config", str(SMOKE), *data, *LONG]
    both = [subprocess.Popen(launch, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in both]
    assert sorted(p.returncode for p in both) == [0, 2], outs
    assert "a job is already there" in outs[[p.returncode for p in both].index(2)][1] or \
        "a job is still running there" in outs[[p.returncode for p in both].index(2)][1]
    (run_dir,) = [p for p in (repo / "runs").iterdir() if not p.is_symlink() and p.is_dir()]
    wrapper = int((run_dir / "worker-0.pid").read_text())
    deadline = time.time() + 60
    while "step" not in (run_dir / "logs" / "worker-0.log").read_text() and time.time() < deadline:
        time.sleep(0.5)
    os.kill(wrapper, signal.SIGKILL)  # the job's wrapper dies; the trainer lives on in its group
    time.sleep(0.5)
    status = json.loads(mllm("status", "--local", "--json", cwd=repo, env=env).stdout)
    assert status["workers"][0]["state"] == "running"
    again = mllm("launch", "nanogpt", "--local", "--config", str(SMOKE), *data, cwd=repo, env=env)
    assert again.returncode == 2 and "a job is still running there" in again.stderr
    t0 = time.time()
    stopped = mllm("stop", "--local", cwd=repo, env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
    assert time.time() - t0 < 30  # the stop flag is looked at every step, not every 2,500
    with pytest.raises(ProcessLookupError):
        os.killpg(wrapper, 0)  # no member of the job's group is left
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["latest_checkpoint_step"] == summary["final_step"] > 0


class SlowTarget(jobs.LocalTarget):
    """This machine, with a stand-in interpreter that lives 5 s whatever it is asked to run."""

    @property
    def python(self) -> str:
        fake = self.root / "fake-python"
        fake.write_text("#!/bin/sh\nsleep 5\n")
        fake.chmod(0o755)
        return str(fake)


def test_simultaneous_starts_under_the_lock_start_exactly_one(tmp_path):
    target = SlowTarget(tmp_path)
    for attempt in range(4):
        barrier = threading.Barrier(2)
        results: list[str] = []

        def one(i: int) -> None:
            spec = jobs.LaunchSpec("nanogpt", "none.yaml", [], f"nanogpt-race{attempt}-{i}", None, None, 1)
            barrier.wait()
            try:
                jobs.start(target, spec)
                results.append("started")
            except jobs.LauncherError as e:
                results.append(str(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert results.count("started") == 1, results
        assert any("a job is already there" in r for r in results), results
        (running,) = jobs.running_jobs(target)
        assert jobs.stop(target, running, grace=2) == "stopped (exit 143)"


def test_a_shape_changed_resume_leaves_the_old_run_untouched(tmp_path):
    args = ["--config", str(SMOKE), "--set", f"data.path={SHAKESPEARE}", "--set", f"output_dir={tmp_path / 'run'}"]
    assert run_trainer(*args, "--set", "train.max_steps=20", cwd=tmp_path).returncode == 0
    before = tree(tmp_path)
    changed = [*args, "--set", "model.n_embd=32", "--set", "train.max_steps=40"]
    out = run_trainer(*changed, "--resume", cwd=tmp_path)  # the recorded settings refuse it first
    assert out.returncode == 2 and out.stderr.startswith(
        "error: --resume: checkpoint 20 was trained with other settings: model.n_embd: 64 -> 32;"), out.stderr
    assert tree(tmp_path) == before
    # Allowed by name, the arrays still cannot fit: refused by their shapes, before anything is written.
    out = run_trainer(*changed, "--resume", "--allow-config-change", "model", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: checkpoint 20 in ") and "differ in shape" in line
    assert tree(tmp_path) == before


def test_a_full_disk_leaves_a_whole_summary_and_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        # A checkpoint of this model is ~1.3 MiB: the first fits, the second does not.
        out = run_trainer("--config", str(SMOKE), "--set", f"data.path={SHAKESPEARE}", "--set",
                          f"output_dir={disk / 'run'}", "--set", "train.keep_checkpoints=5", cwd=tmp_path)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: ") and "a checkpoint needs about" in out.stderr
        summary = json.loads((disk / "run" / "run_summary.json").read_text())
        assert summary["status"] == "failed" and summary["latest_checkpoint_step"] == 20
        # Too small for even one checkpoint: refused before the run dir exists.
        small = run_trainer("--config", str(SMOKE), "--set", f"data.path={SHAKESPEARE}", "--set",
                            f"output_dir={disk / 'other'}", cwd=tmp_path)
        assert small.returncode == 2 and "train.checkpoint_dir" in small.stderr and not (disk / "other").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_repeated_term_still_checkpoints_and_a_dead_coordinator_is_one_line(tmp_path):
    proc = subprocess.Popen(trainer_cmd("--config", str(SMOKE), "--set", f"data.path={SHAKESPEARE}",
                                        "--set", f"output_dir={tmp_path / 'run'}", *LONG),
                            cwd=tmp_path, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # two signals before the handler runs are one signal
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["latest_checkpoint_step"] == summary["final_step"]

    port = free_port()  # nothing listens there: worker 0 never came up
    t0 = time.time()
    hung = run_trainer("--config", str(SMOKE), "--set", "jax.distributed_timeout_sec=3", cwd=tmp_path, timeout=60,
                       env=trainer_env(MLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MLLM_NUM_PROCESSES="2",
                                       MLLM_PROCESS_ID="1"))
    assert hung.returncode == 1 and time.time() - t0 < 30
    assert hung.stderr.strip().splitlines()[-1].startswith("error: jax.distributed: process 1 of 2 could not join")


# -- on sshd workers ----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_workers_run_no_user_text_and_never_choose_laptop_paths(tmp_path, hosts, checkout):
    repo, data = checkout
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        on = lambda w, cmd: subprocess.run(  # noqa: E731
            ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-i", str(tmp_path / "config" / "mllm" / "id_ed25519"), f"root@{hosts.ips[w]}", cmd],
            capture_output=True, text=True)
        assert run("vm", "create", "a", "--zone", ZONE, "--type", "v4-16").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        assert run("sync").returncode == 0

        # 1, 2, 10: the recipe, a --set with a here-document terminator, a config typo.
        evil_set = f"wandb.name=x\nMLLM_JOB_EOF\ntouch {PWNED[0]}\nexit 0\n"
        for argv in (["nanogpt$(touch /tmp/pwned)", "--no-sync"], ["nanogpt;touch /tmp/pwned;", "--no-sync"],
                     ["nanogpt", "--set", evil_set], ["nanogpt", "--set", "train.max_step=1"]):
            out = run("launch", *argv, "--config", "configs/nanogpt/cpu_smoke.yaml", *data)
            assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
            assert not out.stdout.strip(), out.stdout  # nothing synced or started first
        for w in (0, 1):
            assert on(w, "ls ~/mllm-jax/runs 2>/dev/null; ls /tmp/pwned* 2>/dev/null").stdout == ""

        # 3: exec --env-file reads the file as dotenv, the trainer's parser; nothing in it runs.
        env_file = tmp_path / "evil.env"
        env_file.write_text("FOO=$(touch /tmp/pwned)\nNOTE=hello touch /tmp/pwned2\n")
        assert run("env", "push", "--src", str(env_file)).returncode == 0
        shown = run("exec", "--env-file", "/root/.env", "--", "printenv", "FOO", "NOTE")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "[w0] $(touch /tmp/pwned)" in shown.stdout and "[w1] hello touch /tmp/pwned2" in shown.stdout
        cwd = run("exec", "--env-file", "/root/.env", "--", "pwd").stdout.splitlines()
        assert sorted(cwd) == sorted(run("exec", "--", "pwd").stdout.splitlines()) == ["[w0] /root", "[w1] /root"]
        for w in (0, 1):
            assert on(w, "ls /tmp/pwned* 2>/dev/null").stdout == ""

        # 4: fetch-summary writes only under --dest/<validated run id>.
        dest = tmp_path / "results" / "inner"
        outside = tree(tmp_path / "results") if (tmp_path / "results").exists() else {}
        bad = run("fetch-summary", "../../evil", "--dest", str(dest))
        assert bad.returncode == 2 and bad.stderr.startswith("error: run id '../../evil'")
        on(0, "mkdir -p ~/mllm-jax/runs/real /tmp/x && echo '{\"status\": \"completed\"}' > ~/mllm-jax/runs/real/run_summary.json"
              " && cp ~/mllm-jax/runs/real/run_summary.json /tmp/x/ && ln -sfn ../../../../../../tmp/x ~/mllm-jax/runs/latest")
        hostile = run("fetch-summary", "--dest", str(dest))
        assert hostile.returncode == 2 and "not a run id" in hostile.stderr, hostile.stderr
        missing = run("fetch-summary", "nosuch-run", "--dest", str(dest))
        assert missing.returncode == 2 and "not found" in missing.stderr
        assert not dest.exists() and (tree(tmp_path / "results") if (tmp_path / "results").exists() else {}) == outside
        assert not Path("/tmp/x").exists() and not (tmp_path.parent / "evil").exists()
        assert run("vm", "delete", "--yes").returncode == 0
    no_pwned_on_laptop()
