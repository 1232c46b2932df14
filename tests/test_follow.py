"""End-to-end: `mllm logs -f` and `mllm launch --follow` survive a connection that is killed
(the sshd process serving it dies) or frozen (SIGSTOP: no data, no heartbeat) mid-run. They say
so in one line, reconnect on a fresh connection, print every line of the worker's log exactly
once and in order, and end only when the job has ended; a missing run is a one-line error. All
through the real `mllm` CLI and a nanoGPT job on an sshd "worker"."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import MLLM, REPO, SHAKESPEARE, SMOKE, launcher_env, mllm
from harness.sshd import SshHost
from harness.tpu_slice import ZONE, Slice
from mllm_jax import contracts

pytestmark = pytest.mark.e2e  # real sshd workers

CONFIG = "configs/follow_test.yaml"  # committed in the test's checkout (it travels with the sync)
IDLE_SEC = "2"  # MLLM_FOLLOW_IDLE_SEC for these tests: a frozen connection is noticed after 2 s
LOST = re.compile(r"^\[w0\] connection lost \(.+\), reconnecting$")
STEP = re.compile(r"^\[w0\] step \d+/")


@pytest.fixture(scope="module")
def vm(hosts, tmp_path_factory):
    """A one-worker VM (hosts[0]) with the test's interpreter recorded; a checkout holding a
    config whose job prints a `step N/M` line every 10 steps for a few seconds."""
    tmp = tmp_path_factory.mktemp("follow")
    bucket = Path(tempfile.mkdtemp(prefix="mllm-bucket-", dir="/srv"))  # the data, where the worker sees it
    try:
        shutil.copy(SHAKESPEARE, bucket / "input.txt")
        repo = tmp / "checkout"
        subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
        (repo / CONFIG).write_text(SMOKE.read_text() + f"data:\n  path: {bucket / 'input.txt'}\n")
        git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
        git("add", CONFIG)
        git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "follow config")
        with Slice(hosts).api as api:
            env = launcher_env(tmp, api.endpoint, MLLM_FOLLOW_IDLE_SEC=IDLE_SEC)
            run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
            assert run("vm", "create", "follow", "--zone", ZONE, "--type", "v6e-8").returncode == 0
            assert run("bootstrap", "--python", sys.executable).returncode == 0
            yield SimpleNamespace(repo=repo, env=env, host=hosts[0], run=run)
            run("vm", "delete", "--yes")
    finally:
        shutil.rmtree(bucket, ignore_errors=True)


class Follower:
    """A `mllm` subprocess whose stdout lines are collected as they come."""

    def __init__(self, vm: SimpleNamespace, *args: str):
        self.proc = subprocess.Popen([MLLM, *args], cwd=vm.repo, env=vm.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(pattern.match(line) for line in self.lines):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} early:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, "no such line yet:\n" + "\n".join(self.lines)
            time.sleep(0.05)

    def finish(self, timeout: float) -> tuple[int, list[str], str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still following after {timeout:.0f}s:\n" + "\n".join(self.lines[-20:]))
        self._reader.join(10)
        return self.proc.returncode, self.lines, self.proc.stderr.read()


def _stat(pid: int) -> tuple[str, int]:
    """(comm, parent pid) of a process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.index("(") + 1:text.rindex(")")], int(text[text.rindex(")") + 2:].split()[1])


def sessions(host: SshHost) -> set[int]:
    """The host's sshd processes that serve a connection: every sshd but the listener (whose
    parent is the harness's `unshare`)."""
    found = set()
    for pid in host.pids():
        try:
            comm, ppid = _stat(pid)
            if comm.startswith("sshd") and _stat(ppid)[0].startswith("sshd"):
                found.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def worker_path(host: SshHost, relative: str) -> Path:
    """A file in the worker's repo, seen from here."""
    return host.root / "root" / contracts.REMOTE_REPO.removeprefix("~/") / relative


def run_files(host: SshHost, run_id: str) -> tuple[Path, Path]:
    run = f"{contracts.RUNS_DIR}/{run_id}"
    return (worker_path(host, f"{run}/{contracts.worker_log(0)}"),
            worker_path(host, f"{run}/{contracts.worker_file(0, 'exit')}"))


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def followed(lines: list[str]) -> list[str]:
    """The log lines of a follower's output: `[w0]` lines, less the reconnection notices."""
    return [line.removeprefix("[w0] ") for line in lines if line.startswith("[w0] ") and not LOST.match(line)]


def launch_args(*extra: str, steps: int = 1000) -> list[str]:
    return ["launch", "nanogpt", "--config", CONFIG, "--set", f"train.max_steps={steps}", "--set",
            "train.log_every=10", "--set", "train.eval_every=500", "--set", "train.checkpoint_every=0", "--force", *extra]


def test_logs_f_and_launch_follow_survive_a_killed_connection(vm):
    base = sessions(vm.host)
    launch = Follower(vm, *launch_args("--follow"))
    launch.wait_for(re.compile("^run "))
    run_id = next(line.split()[1].rstrip(":") for line in launch.lines if line.startswith("run "))
    logs = Follower(vm, "logs", "-f", run_id)
    launch.wait_for(STEP)
    logs.wait_for(STEP)  # both are following: kill them while the job runs
    serving = sessions(vm.host) - base  # the two followers' connections
    assert len(serving) >= 2, serving
    log, exit_file = run_files(vm.host, run_id)
    signal_all(serving, signal.SIGKILL)
    lines_at_kill = len(log.read_text().splitlines())
    assert not exit_file.exists(), "the job ended before the connections were killed: make it longer"

    code, logs_out, logs_err = logs.finish(180)
    assert exit_file.exists(), ("logs -f ended before the job did", code, logs_out, logs_err)
    launch_code, launch_out, launch_err = launch.finish(60)
    assert exit_file.read_text().strip() == "0"
    assert code == 0, logs_err
    assert launch_code == 0, launch_err  # the job's exit code (today: 1, its exit file not there yet)

    final = log.read_text().splitlines()
    assert len(final) > lines_at_kill + 5  # the job ran on well after the kill
    assert final == followed(vm.run("logs", run_id).stdout.splitlines())  # what `mllm logs` shows
    after_launch = launch_out[next(i for i, line in enumerate(launch_out) if line.startswith("run ")) + 1:]
    for out in (logs_out, after_launch):
        assert followed(out) == final  # every line once, in order
        notices = [line for line in out if LOST.match(line)]
        assert len(notices) >= 1 and all("reconnecting" in n for n in notices), out
    assert logs_err == "" and "Traceback" not in launch_err


def test_logs_f_survives_a_frozen_connection(vm):
    started = vm.run(*launch_args())
    assert started.returncode == 0, started.stderr
    run_id = next(line.split()[1].rstrip(":") for line in started.stdout.splitlines() if line.startswith("run "))
    base = sessions(vm.host)
    logs = Follower(vm, "logs", "-f", run_id)
    logs.wait_for(STEP)
    serving = sessions(vm.host) - base
    assert serving
    log, exit_file = run_files(vm.host, run_id)
    signal_all(serving, signal.SIGSTOP)  # the connection stays open, and silent
    try:
        assert not exit_file.exists(), "the job ended before the connection froze: make it longer"
        code, out, err = logs.finish(60)  # today: hangs until the sshd wakes up
    finally:
        signal_all(serving, signal.SIGKILL)
        signal_all(serving, signal.SIGCONT)
    assert exit_file.exists(), (code, out, err)
    assert exit_file.read_text().strip() == "0"
    assert code == 0, err
    assert f"[w0] connection lost (no output or heartbeat for {IDLE_SEC}s), reconnecting" in out, out
    assert followed(out) == log.read_text().splitlines()  # every line once, in order
    assert err == ""


def test_logs_f_of_a_missing_run_is_one_line(vm):
    out = vm.run("logs", "-f", "nanogpt-20200101-000000-nosuchrun")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, out.stderr
    assert "nanogpt-20200101-000000-nosuchrun" in out.stderr and out.stdout == ""


def test_local_follow_prints_the_log_alone(tmp_path):
    """`--local` follows a job on this machine the same way (no heartbeat in the output), and
    ends when its exit file appears."""
    run_id = "nanogpt-20200101-000000-local"
    run = tmp_path / contracts.RUNS_DIR / run_id
    (run / contracts.LOGS_DIR).mkdir(parents=True)
    exit_file = run / contracts.worker_file(0, "exit")
    job = subprocess.Popen(["sh", "-c", f"for i in 1 2 3 4 5 6; do echo line $i; sleep 0.3; done; printf last; "
                                        f"echo 3 > {exit_file}"],
                           stdout=(run / contracts.worker_log(0)).open("w"), start_new_session=True)
    (run / contracts.worker_file(0, "pid")).write_text(f"{job.pid}\n")
    env = {k: v for k, v in launcher_env(tmp_path, "http://127.0.0.1:9").items() if k != "MLLM_TPU_API_ENDPOINT"}
    out = mllm("logs", "-f", "--local", run_id, cwd=tmp_path, env=env, timeout=60)
    job.wait()
    assert out.returncode == 3, out.stderr  # the job's exit code
    assert out.stdout.splitlines() == [f"[local] line {i}" for i in range(1, 7)] + ["[local] last"]
    assert out.stderr == ""

    # A job gone without an exit code (its wrapper was killed): one line says so, no endless wait.
    lost_id = "nanogpt-20200101-000000-lost"
    lost = tmp_path / contracts.RUNS_DIR / lost_id
    (lost / contracts.LOGS_DIR).mkdir(parents=True)
    (lost / contracts.worker_log(0)).write_text("step 1\n")
    (lost / contracts.worker_file(0, "pid")).write_text(f"{job.pid}\n")  # reaped above: no such process
    out = mllm("logs", "-f", "--local", lost_id, cwd=tmp_path, env=env, timeout=60)
    assert out.stdout.splitlines()[0] == "[local] step 1" and len(out.stdout.splitlines()) == 2, out.stdout
    assert "status lost" in out.stdout.splitlines()[1] and out.stderr == "" and out.returncode == 1
