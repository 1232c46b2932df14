"""Detached training jobs: start, status, logs and stop, on TPU workers or on this machine.

Every action is a short POSIX shell script run on a `Target` (a worker over SSH, or this
machine), so `--local` runs exactly the lifecycle a VM does. The files follow the run-dir
contract (docs/contracts.md): `runs/<id>/logs/worker-<k>.log`, `worker-<k>.pid` (the job's
session leader), `worker-<k>.exit`, `worker-<k>.sh` (the command, without secrets) and
`runs/latest`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from launcher import readback, ssh
from launcher.errors import LauncherError
from launcher.remote import remote_python
from mllm_jax import contracts
from mllm_jax.contracts import STOP_GRACE_SEC, worker_file, worker_log

RUNS = contracts.RUNS_DIR


class Target(Protocol):
    index: int
    label: str
    repo: str
    """The repo directory on the target (shell syntax, e.g. "$HOME/mllm-jax")."""
    python: str
    """The interpreter that runs the trainer there (shell syntax)."""

    def sh(self, script: str, stdin: str | None = None) -> tuple[int, str]:
        """Run a shell script (with `stdin` as its input, if given); (exit code, combined output)."""

    def stream(self, script: str, on_line: Callable[[str], None], idle_timeout: float | None = None) -> int:
        """Run a shell script, passing each output line on as it comes. With `idle_timeout`, the
        script writes a heartbeat to stderr: stdout alone is passed on, and a connection silent
        for that long raises ssh.ConnectionLost."""


@dataclass
class RemoteTarget:
    conns: ssh.Connections
    worker: ssh.Worker
    repo: str = '"$HOME"/' + contracts.REMOTE_REPO.removeprefix("~/")
    python: str = remote_python()  # as `mllm bootstrap` chose

    @property
    def index(self) -> int:
        return self.worker.index

    @property
    def label(self) -> str:
        return self.worker.label

    def sh(self, script: str, stdin: str | None = None) -> tuple[int, str]:
        return ssh.capture(self.conns, self.worker, f"sh -c {shlex.quote(script)}",
                           stdin=None if stdin is None else stdin.encode())

    def stream(self, script: str, on_line: Callable[[str], None], idle_timeout: float | None = None) -> int:
        return ssh.run(self.conns, self.worker, f"sh -c {shlex.quote(script)}", on_line=on_line,
                       idle_timeout=idle_timeout)


@dataclass
class LocalTarget:
    root: Path
    index: int = 0
    label: str = "local"

    @property
    def repo(self) -> str:
        return shlex.quote(str(self.root))

    @property
    def python(self) -> str:
        return shlex.quote(sys.executable)

    def sh(self, script: str, stdin: str | None = None) -> tuple[int, str]:
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, input=stdin or "")
        return out.returncode, (out.stdout + out.stderr).rstrip("\n")

    def stream(self, script: str, on_line: Callable[[str], None], idle_timeout: float | None = None) -> int:
        # No connection to lose here: a heartbeat on stderr is dropped.
        stderr = subprocess.DEVNULL if idle_timeout is not None else subprocess.STDOUT
        proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()


def _checked(t: Target, script: str, what: str) -> str:
    code, out = t.sh(script)
    if code:
        raise LauncherError(f"{t.label}: {what} failed (exit {code}): {out.strip()[-300:]}")
    return out


def run_path(run_id: str) -> str:
    """`runs/<id>` for a run id that is one safe path component (refused otherwise)."""
    if not contracts.is_run_id(run_id):
        raise LauncherError(f"run id {run_id!r}: expected letters, digits, '.', '_' or '-' (e.g. nanogpt-20260101-120000-abc1234)")
    return f"{RUNS}/{run_id}"


# A job is the process group of its wrapper (`worker-K.pid` holds the group id): the trainer
# stays in it even when the wrapper is gone, so every check below signals the whole group.
_LIVE_JOBS = f"""for f in {RUNS}/*/worker-*.pid; do
  case "$f" in {RUNS}/{contracts.LATEST}/*) continue;; esac
  if [ -f "$f" ] && kill -0 "-$(cat "$f")" 2>/dev/null; then echo "MLLM_BUSY $f"; fi
done"""


def running_jobs(t: Target) -> list[str]:
    """Run ids with a live job (any process of its group) on this target."""
    out = _checked(t, f"""cd {t.repo} 2>/dev/null || exit 0
{_LIVE_JOBS}
exit 0""", "looking for running jobs")
    return sorted({line.split("/")[1] for line in out.splitlines() if line.startswith(f"MLLM_BUSY {RUNS}/")})


@dataclass
class LaunchSpec:
    recipe: str
    config: str
    overrides: list[str]
    run_id: str
    env_file: str | None
    """Env file on the target, passed to the trainer's --env-file (the values never appear here)."""
    coordinator: str | None
    num_processes: int
    resume: bool = False
    """Continue the existing run `run_id` from its latest checkpoint (the trainer's --resume):
    its dir is reused, the old exit file removed and the log appended to."""
    resume_if_any: bool = False
    """With `resume`: the trainer's --resume-if-any (no checkpoint yet: start from step 0)."""
    recoveries: int = 0
    """Times the supervisor recreated the VM for this run ($MLLM_RECOVERIES, in run_summary.json)."""
    allow_config_change: tuple[str, ...] = ()
    """With `resume`: the trainer's --allow-config-change KEY for each."""


BUSY_EXIT = 75
"""The start script's exit code when another job (or launch) holds the target."""


def job_script(t: Target, spec: LaunchSpec, process_id: int) -> str:
    """The job's wrapper script (`worker-K.sh`): every user-given word is quoted, and the file
    reaches the target as data (never through a here-document). It records the trainer's exit
    code; a TERM to the job's group reaches the trainer directly (the wrapper only waits)."""
    run = run_path(spec.run_id)
    train = ['"$PY"', "-m", "mllm_jax", "train", shlex.quote(spec.recipe), "--config", shlex.quote(spec.config),
             "--set", shlex.quote(f"output_dir={run}")]
    for item in spec.overrides:
        train += ["--set", shlex.quote(item)]
    if spec.env_file:
        train += ["--env-file", shlex.quote(spec.env_file)]
    if spec.resume:
        train.append("--resume-if-any" if spec.resume_if_any else "--resume")
        for key in spec.allow_config_change:
            train += ["--allow-config-change", shlex.quote(key)]
    env = f"export {contracts.ENV_RECOVERIES}={spec.recoveries}\n" if spec.recoveries else ""
    if spec.num_processes > 1:
        env += (f"export {contracts.ENV_COORDINATOR}={shlex.quote(spec.coordinator or '')} "
                f"{contracts.ENV_NUM_PROCESSES}={spec.num_processes} {contracts.ENV_PROCESS_ID}={process_id}\n")
    return f"""PY={t.python}
{env}{" ".join(train)} &
child=$!
trap : TERM INT
wait $child; code=$?
while kill -0 $child 2>/dev/null; do wait $child; code=$?; done
echo $code > {run}/{worker_file(t.index, "exit")}
exit $code
"""


def start(t: Target, spec: LaunchSpec, process_id: int = 0) -> None:
    """Start process `process_id` of the job on one target, detached in its own session (it
    outlives the connection). Under a lock on the target (`runs/.launch.lock`), it refuses when
    a job is alive there or the run dir exists: of two simultaneous launches, one starts."""
    k = t.index
    run = run_path(spec.run_id)
    fresh = (f'rm -f {run}/{worker_file(k, "exit")}' if spec.resume
             else f'[ ! -e {run} ] || {{ echo "MLLM_BUSY {run} exists"; exit {BUSY_EXIT}; }}')
    code, out = t.sh(f"""set -e
cd {t.repo}
mkdir -p {RUNS}
exec 9>{RUNS}/.launch.lock
flock -w 30 9 || {{ echo "MLLM_BUSY another launch holds {RUNS}/.launch.lock"; exit {BUSY_EXIT}; }}
{_LIVE_JOBS.replace('echo "MLLM_BUSY $f";', 'echo "MLLM_BUSY $f"; exit ' + str(BUSY_EXIT) + ';')}
{fresh}
mkdir -p {run}/{contracts.LOGS_DIR}
cat > {run}/{worker_file(k, "sh")}
{_CLEAR_STALE_TPU_LOCK}
ln -sfn {spec.run_id} {RUNS}/{contracts.LATEST}
setsid nohup sh {run}/{worker_file(k, "sh")} {">>" if spec.resume else ">"} {run}/{worker_log(k)} 2>&1 < /dev/null 9>&- &
pid=$!
echo $pid > {run}/{worker_file(k, "pid")}
# Hold the lock until the job's own process group exists (setsid has run): the liveness checks
# look for the group, so a launch that came in earlier would see no job and start a second one.
i=0; while ! kill -0 -$pid 2>/dev/null && kill -0 $pid 2>/dev/null && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done""",
             stdin=job_script(t, spec, process_id))
    if code == BUSY_EXIT:
        what = next((line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("MLLM_BUSY ")), "busy")
        raise LauncherError(f"{t.label}: not started, a job is already there ({what}): `mllm stop` it or pass --force")
    if code:
        raise LauncherError(f"{t.label}: starting the job failed (exit {code}): {out.strip()[-300:]}")


# libtpu leaves /tmp/libtpu_lockfile behind when a job dies; it blocks the next one ("TPU
# already in use"). Remove it only when no live process holds a TPU device open.
_CLEAR_STALE_TPU_LOCK = """if [ -e /tmp/libtpu_lockfile ]; then
  busy=0
  for fd in /proc/[0-9]*/fd/*; do
    case "$(readlink "$fd" 2>/dev/null)" in /dev/accel*|/dev/vfio/*) busy=1; break;; esac
  done
  [ $busy = 0 ] && rm -f /tmp/libtpu_lockfile
fi"""


@dataclass
class WorkerStatus:
    worker: int
    state: str
    """running | exited N | lost | missing"""
    last_step: int | None
    last_line: str
    checkpoint: int | None = None
    """The latest complete checkpoint's step, as the trainer last logged it (contracts: metrics.jsonl)."""


def status(t: Target, run_id: str) -> WorkerStatus:
    run = run_path(run_id)
    k = t.index
    pid = f"{run}/{worker_file(k, 'pid')}"
    exitf, metrics, log = f"{run}/{worker_file(k, 'exit')}", f"{run}/{contracts.METRICS_FILE}", f"{run}/{worker_log(k)}"
    # Regular files only, and bounded reads: a worker's FIFO or link to /dev/zero must not hang us.
    code, out = t.sh(f"""cd {t.repo} 2>/dev/null && [ -d {run} ] || {{ echo MISSING; exit 0; }}
if [ -f {exitf} ]; then echo "EXITED $(head -c 64 {exitf} | head -n 1)"
elif [ -f {pid} ] && kill -0 "-$(head -c 64 {pid})" 2>/dev/null; then echo RUNNING
else echo LOST; fi
[ -f {metrics} ] && timeout 20 tail -c 262144 {metrics} | grep '"train/loss"' | tail -n 1 | sed 's/^/STEP /'
[ -f {log} ] && timeout 20 tail -c 65536 {log} | tail -n 1 | head -c 2000 | sed 's/^/LAST /'
exit 0""")
    lines = out.splitlines()
    head = lines[0] if lines else "LOST"
    state = {"RUNNING": "running", "LOST": "lost", "MISSING": "missing"}.get(head, "")
    if head.startswith("EXITED"):
        exit_text = head[len("EXITED"):].strip()
        state = f"exited {int(exit_text)}" if re.fullmatch(r"-?\d{1,4}", exit_text) else "lost"
    step = checkpoint = None
    for line in lines:
        if line.startswith("STEP "):
            try:
                event = json.loads(line[5:])
            except ValueError:
                event = None
            if isinstance(event, dict):
                step, checkpoint = _count(event.get("step")), _count(event.get("checkpoint/step"))
    last = next((line[5:] for line in lines if line.startswith("LAST ")), "")
    return WorkerStatus(k, state or "lost", step, readback.printable(last), checkpoint)


def _count(value: Any) -> int | None:
    """A step number from a worker's metrics line, or None for anything else (e.g. "x", true, -1):
    a status shows what it can rather than fail on one bad line."""
    try:
        return readback.integer(value, "step", minimum=0)
    except LauncherError:
        return None


def follow(t: Target, run_id: str, on_line: Callable[[str], None], from_line: int = 1,
           until_exit: bool = True) -> int | None:
    """Stream a worker's log from line `from_line` (1-based) to `on_line`.

    With `until_exit`, until the job ends: its exit file exists, or its process group is gone.
    Returns the job's exit code, or None when it is gone without having written one (lost). The
    command also writes a heartbeat to stderr, so that a dead or frozen connection is
    noticed (`ssh.follow_idle_sec()`): then, and when the stream ends while the job still runs,
    raises ssh.ConnectionLost. Only complete lines are passed on, so `from_line` = the lines
    received so far + 1 resumes exactly. A run with no log there is a LauncherError."""
    missing, running, lost = 3, 4, 5  # the script's exit codes other than 0 (the job ended)
    run = run_path(run_id)
    k = t.index
    log, exitf = f"{run}/{worker_log(k)}", f"{run}/{worker_file(k, 'exit')}"
    alive = '[ -n "$pid" ] && kill -0 -"$pid" 2>/dev/null'  # the job's process group (dash has no `kill --`)
    idle = ssh.follow_idle_sec()
    beat = max(0.2, min(2.0, idle / 4))
    # tail reads to the end once more after the process --pid names is gone: that process is a
    # watcher that lives as long as the job does. Helpers hold neither stdout (the log alone) nor,
    # but for the heartbeat, stderr: the stream ends when tail does.
    script = f"""cd {t.repo} 2>/dev/null && [ -f {log} ] || exit {missing}
pid=$(cat {run}/{worker_file(k, "pid")} 2>/dev/null)
w=
"""
    if until_exit:
        script += f"""( while [ ! -f {exitf} ] && {alive}; do sleep 0.5; done ) </dev/null >/dev/null 2>&1 &
w=$!
tail -n +{int(from_line)} -s 0.5 -F --pid=$w {log} 2>/dev/null </dev/null &
"""
    else:
        script += f"tail -n +{int(from_line)} -F {log} 2>/dev/null </dev/null &\n"
    # The heartbeat; a write to a connection that is gone fails: then stop tail (and the watcher).
    script += f"""t=$!
( trap '' PIPE; while kill -0 $t 2>/dev/null; do echo . >&2 || {{ kill $t $w 2>/dev/null; exit; }}; \
sleep {beat:g} 2>/dev/null; done ) </dev/null >/dev/null &
h=$!
wait $t
kill $w $h 2>/dev/null
if [ -f {exitf} ]; then
  [ -z "$(tail -c 1 {log})" ] || echo  # end a last line that has no newline yet
  exit 0
fi
{alive} && exit {running}
exit {lost}"""
    code = t.stream(script, on_line, idle_timeout=idle)
    if code == missing:
        raise LauncherError(f"{t.label}: no run {run_id} there ({RUNS}/{run_id}/{worker_log(k)} is missing)")
    if code == running:
        raise ssh.ConnectionLost("the log stream ended while the job runs")
    if code == lost:
        return None
    if code != 0:
        raise ssh.ConnectionLost(f"the follow command ended with exit code {code}")
    try:
        found = exit_code(t, run_id)
    except ssh.TRANSPORT_ERRORS as e:
        raise ssh.ConnectionLost(f"reading the exit code: {e or type(e).__name__}") from None
    return found if found is not None else 1


def read_log(t: Target, run_id: str) -> str:
    """The job's log on one target so far (its last readback.LOG_MAX_BYTES)."""
    code, out = t.sh(readback.read_script(f"{t.repo}/{run_path(run_id)}/{worker_log(t.index)}",
                                          readback.LOG_MAX_BYTES, tail=True))
    if code:
        raise LauncherError(f"{t.label}: no log for run {run_id}")
    return out


def exit_code(t: Target, run_id: str) -> int | None:
    """The job's recorded exit code; None when there is none, or it is not a plain number."""
    code, out = t.sh(readback.read_script(f"{t.repo}/{run_path(run_id)}/{worker_file(t.index, 'exit')}",
                                          readback.SMALL_MAX_BYTES) + " 2>/dev/null")
    return int(out.strip()) if code == 0 and re.fullmatch(r"-?\d{1,4}", out.strip()) else None


NO_RUN = "no such run"
"""`stop`'s outcome on a target that has no dir for the run."""


def stop(t: Target, run_id: str, grace: float = STOP_GRACE_SEC) -> str:
    """TERM the job's whole process group (the trainer checkpoints and exits), then KILL the
    group after `grace` seconds; the exit file is written either way (if the wrapper that
    writes it is gone, a killed job gets EXIT_KILLED)."""
    run = run_path(run_id)
    k = t.index
    exitf = f"{run}/{worker_file(k, 'exit')}"
    out = _checked(t, f"""cd {t.repo} 2>/dev/null && [ -d {run} ] || {{ echo "{NO_RUN}"; exit 0; }}
pidf={run}/{worker_file(k, "pid")}
[ -f $pidf ] || {{ echo "no job"; exit 0; }}
pid=$(cat $pidf)
kill -0 -$pid 2>/dev/null || {{ echo "not running"; exit 0; }}
kill -TERM -$pid
i=0
while kill -0 -$pid 2>/dev/null && [ $i -lt {int(grace * 10)} ]; do sleep 0.1; i=$((i+1)); done
if kill -0 -$pid 2>/dev/null; then
  kill -KILL -$pid 2>/dev/null
  while kill -0 -$pid 2>/dev/null; do sleep 0.1; done
  [ -f {exitf} ] || echo {contracts.EXIT_KILLED} > {exitf}
  echo killed
elif [ -f {exitf} ]; then
  echo "stopped (exit $(cat {exitf}))"
else
  echo "stopped (its wrapper was gone, so no exit code was recorded)"
fi""", "stopping the job")
    return out.strip().splitlines()[-1]


def checkpoint_steps(t: Target, directory: str) -> list[int]:
    """The complete checkpoints' steps in `directory` (relative to the repo, or absolute) on the
    target: orbax names a finished one by its step alone, one being written has a suffix."""
    code, out = t.sh(f"cd {t.repo} && ls -1 {shlex.quote(directory)} 2>/dev/null")
    return sorted(int(name) for name in out.split() if name.isdigit()) if code == 0 else []


def latest_run(t: Target) -> str:
    """The run `runs/latest` names on the target; a link that is not a plain run id (a worker
    could point it anywhere) is refused, so a worker never chooses a path on the laptop."""
    code, out = t.sh(f"readlink {t.repo}/{RUNS}/{contracts.LATEST}")
    if code or not out.strip():
        raise LauncherError(f"{t.label}: no runs yet ({RUNS}/{contracts.LATEST} is missing); launch one first")
    found = out.strip()
    if not contracts.is_run_id(found):
        raise LauncherError(f"{t.label}: {RUNS}/{contracts.LATEST} points at {found!r}, not a run id; name the run")
    return found
