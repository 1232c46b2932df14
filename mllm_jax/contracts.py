"""The names both halves agree on: the launcher (laptop) and the trainer (every worker) meet
only through a command line, environment variables and a run directory (docs/contracts.md).
Each name is defined here once. Standard library only: the launcher imports this module and
never JAX.
"""

from __future__ import annotations

import time

# -- environment set by the launcher for a multi-process run -------------------------------------
ENV_COORDINATOR = "MLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "MLLM_PROCESS_ID"
COORDINATOR_PORT = 8476
"""Port of process 0's jax.distributed coordinator, on worker 0's internal IP."""

# -- run directory --------------------------------------------------------------------------------
RUNS_DIR = "runs"
"""Run dirs live in <repo>/runs/<run id>/ on every worker (and locally)."""
LATEST = "latest"
"""runs/latest -> the newest run dir."""
CONFIG_FILE = "config_resolved.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "run_summary.json"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
RUN_ID_TIME = "%Y%m%d-%H%M%S"
"""The UTC time in a run id: <recipe>-<time>-<short sha>."""


def run_id(recipe: str, sha: str, when: float | None = None) -> str:
    """A new run's id: recipe, UTC time (`when`, default now) and the commit's short sha."""
    return f"{recipe}-{time.strftime(RUN_ID_TIME, time.gmtime(time.time() if when is None else when))}-{sha[:7]}"


def worker_log(k: int) -> str:
    """The job's stdout+stderr on worker k, relative to the run dir."""
    return f"{LOGS_DIR}/worker-{k}.log"


def worker_file(k: int, kind: str) -> str:
    """`worker-<k>.pid` (session leader), `.exit` (exit code) or `.sh` (the job script)."""
    assert kind in ("pid", "exit", "sh"), kind
    return f"worker-{k}.{kind}"


# -- what the launcher leaves on a worker -----------------------------------------------------------
REMOTE_REPO = "~/mllm-jax"
"""The synced repo on every worker (shell syntax; the trainer runs there)."""
PYTHON_RECORD = "~/.mllm/python"
"""The interpreter `mllm bootstrap` chose (shell syntax)."""
DEFAULT_VENV = "/root/mllm-venv"
INSTALL_RECORD = "mllm-install.json"
"""In the venv: what `mllm bootstrap` installed there."""

# -- exit codes of `python -m mllm_jax train` ------------------------------------------------------
EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143
"""SIGTERM/SIGINT: a checkpoint was saved (128 + SIGTERM)."""
EXIT_KILLED = 137
"""`mllm stop` had to KILL the job (128 + SIGKILL)."""
STOP_GRACE_SEC = 60
"""`mllm stop`: seconds between TERM (the trainer checkpoints) and KILL."""
