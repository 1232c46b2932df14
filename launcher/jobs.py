"""Detached training jobs: start, status, logs and stop, on TPU workers or on this machine.

Every action is a short POSIX shell script run on a `Target` (a worker over SSH, or this
machine), so `--local` runs exactly the lifecycle a VM does. The files follow the run-dir
contract (docs/contracts.md): `runs/<id>/logs/worker-<k>.log`, `worker-<k>.pid` (the job's
session leader), `worker-<k>.exit`, `worker-<k>.sh` (the command, without secrets) and
`runs/latest`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from launcher import ssh
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

    def sh(self, script: str) -> tuple[int, str]:
        """Run a shell script; (exit code, combined output)."""

    def stream(self, script: str, on_line: Callable[[str], None]) -> int:
        """Run a shell script, passing each output line on as it comes."""


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

    def sh(self, script: str) -> tuple[int, str]:
        return ssh.capture(self.conns, self.worker, f"sh -c {shlex.quote(script)}")

    def stream(self, script: str, on_line: Callable[[str], None]) -> int:
        return ssh.run(self.conns, self.worker, f"sh -c {shlex.quote(script)}", on_line=on_line)


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

    def sh(self, script: str) -> tuple[int, str]:
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        return out.returncode, (out.stdout + out.stderr).rstrip("\n")

    def stream(self, script: str, on_line: Callable[[str], None]) -> int:
        proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()


def _checked(t: Target, script: str, what: str) -> str:
    code, out = t.sh(script)
    if code:
        raise LauncherError(f"{t.label}: {what} failed (exit {code}): {out.strip()[-300:]}")
    return out


def running_jobs(t: Target) -> list[str]:
    """Run ids with a live job process on this target."""
    out = _checked(t, f"""cd {t.repo} 2>/dev/null || exit 0
for f in {RUNS}/*/worker-*.pid; do
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && echo "$f"
done; exit 0""", "looking for running jobs")
    return sorted({line.split("/")[1] for line in out.splitlines() if line.startswith(f"{RUNS}/")})


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


def start(t: Target, spec: LaunchSpec, process_id: int = 0) -> None:
    """Start process `process_id` of the job on one target, detached in its own session (it
    outlives the connection)."""
    k = t.index
    run = f"{RUNS}/{spec.run_id}"
    train = ['"$PY"', "-m", "mllm_jax", "train", shlex.quote(spec.recipe), "--config", shlex.quote(spec.config),
             "--set", shlex.quote(f"output_dir={run}")]
    for item in spec.overrides:
        train += ["--set", shlex.quote(item)]
    if spec.env_file:
        train += ["--env-file", shlex.quote(spec.env_file)]
    env = ""
    if spec.num_processes > 1:
        env = (f"export {contracts.ENV_COORDINATOR}={shlex.quote(spec.coordinator or '')} "
               f"{contracts.ENV_NUM_PROCESSES}={spec.num_processes} {contracts.ENV_PROCESS_ID}={process_id}\n")
    # The job script: forwards TERM/INT to the trainer (which checkpoints and exits 143) and
    # always records the exit code.
    job = f"""PY={t.python}
{env}{" ".join(train)} &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
wait $child; code=$?
while kill -0 $child 2>/dev/null; do wait $child; code=$?; done
echo $code > {run}/{worker_file(k, "exit")}
exit $code
"""
    _checked(t, f"""set -e
cd {t.repo}
mkdir -p {run}/{contracts.LOGS_DIR}
cat > {run}/{worker_file(k, "sh")} <<'MLLM_JOB_EOF'
{job}MLLM_JOB_EOF
{_CLEAR_STALE_TPU_LOCK}
ln -sfn {shlex.quote(spec.run_id)} {RUNS}/{contracts.LATEST}
setsid nohup sh {run}/{worker_file(k, "sh")} > {run}/{worker_log(k)} 2>&1 < /dev/null &
echo $! > {run}/{worker_file(k, "pid")}""", "starting the job")


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


def status(t: Target, run_id: str) -> WorkerStatus:
    run = f"{RUNS}/{shlex.quote(run_id)}"
    k = t.index
    pid = f"{run}/{worker_file(k, 'pid')}"
    code, out = t.sh(f"""cd {t.repo} 2>/dev/null && [ -d {run} ] || {{ echo MISSING; exit 0; }}
if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo RUNNING
elif [ -f {run}/{worker_file(k, "exit")} ]; then echo "EXITED $(cat {run}/{worker_file(k, "exit")})"
else echo LOST; fi
tail -n 200 {run}/{contracts.METRICS_FILE} 2>/dev/null | grep '"train/loss"' | tail -n 1 | sed 's/^/STEP /'
tail -n 1 {run}/{worker_log(k)} 2>/dev/null | sed 's/^/LAST /'""")
    lines = out.splitlines()
    head = lines[0] if lines else "LOST"
    state = {"RUNNING": "running", "LOST": "lost", "MISSING": "missing"}.get(head, head.replace("EXITED", "exited"))
    step = next((int(line.split('"step": ')[1].split(",")[0]) for line in lines if line.startswith("STEP ")), None)
    last = next((line[5:] for line in lines if line.startswith("LAST ")), "")
    return WorkerStatus(k, state, step, last)


def follow(t: Target, run_id: str, on_line: Callable[[str], None], from_line: int = 1,
           until_exit: bool = True) -> int:
    """Stream a worker's log from line `from_line`; with `until_exit`, stop when the job ends."""
    run = f"{RUNS}/{shlex.quote(run_id)}"
    k = t.index
    pid_opt = f'--pid="$(cat {run}/{worker_file(k, "pid")})"' if until_exit else ""
    return t.stream(f"cd {t.repo} && exec tail -n +{from_line} -F {pid_opt} {run}/{worker_log(k)} 2>/dev/null",
                    on_line)


def read_log(t: Target, run_id: str) -> str:
    """The job's log on one target so far."""
    code, out = t.sh(f"cat {t.repo}/{RUNS}/{shlex.quote(run_id)}/{worker_log(t.index)}")
    if code:
        raise LauncherError(f"{t.label}: no log for run {run_id}")
    return out


def exit_code(t: Target, run_id: str) -> int | None:
    code, out = t.sh(f"cat {t.repo}/{RUNS}/{shlex.quote(run_id)}/{worker_file(t.index, 'exit')} 2>/dev/null")
    return int(out.strip()) if code == 0 and out.strip().lstrip("-").isdigit() else None


def stop(t: Target, run_id: str, grace: float = STOP_GRACE_SEC) -> str:
    """TERM the job (the trainer checkpoints and exits), then KILL its whole session after
    `grace` seconds; the exit file is written either way."""
    run = f"{RUNS}/{shlex.quote(run_id)}"
    k = t.index
    out = _checked(t, f"""cd {t.repo}
pidf={run}/{worker_file(k, "pid")}
[ -f $pidf ] || {{ echo "no job"; exit 0; }}
pid=$(cat $pidf)
kill -0 $pid 2>/dev/null || {{ echo "not running"; exit 0; }}
kill -TERM $pid
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt {int(grace * 10)} ]; do sleep 0.1; i=$((i+1)); done
if kill -0 $pid 2>/dev/null; then
  kill -KILL -$pid 2>/dev/null; kill -KILL $pid 2>/dev/null
  [ -f {run}/{worker_file(k, "exit")} ] || echo {contracts.EXIT_KILLED} > {run}/{worker_file(k, "exit")}
  echo killed
else
  echo "stopped (exit $(cat {run}/{worker_file(k, "exit")} 2>/dev/null))"
fi""", "stopping the job")
    return out.strip().splitlines()[-1]


def latest_run(t: Target) -> str:
    code, out = t.sh(f"readlink {t.repo}/{RUNS}/{contracts.LATEST}")
    if code or not out.strip():
        raise LauncherError(f"{t.label}: no runs yet ({RUNS}/{contracts.LATEST} is missing); launch one first")
    return out.strip()

