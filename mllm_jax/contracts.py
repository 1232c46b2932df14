"""The names both halves agree on: the launcher (laptop) and the trainer (every worker) meet
only through a command line, environment variables and a run directory (docs/contracts.md).
Each name is defined here once. Standard library only: the launcher imports this module and
never JAX.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Literal, TypedDict

# -- environment set by the launcher for a multi-process run -------------------------------------
ENV_COORDINATOR = "MLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "MLLM_PROCESS_ID"
ENV_RECOVERIES = "MLLM_RECOVERIES"
"""How many times the recovery supervisor (`mllm watch`) has recreated the run's VM and resumed
it; the trainer reports it as `recoveries` in run_summary.json (0 when unset)."""
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


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def is_run_id(text: str) -> bool:
    """Whether `text` can name a run: one path component of letters, digits, `.`, `_` and `-`
    (never `..`, `/` or a control character), so that it is safe in a path and a shell word."""
    return bool(_RUN_ID.fullmatch(text)) and ".." not in text


def control_chars(text: str) -> list[str]:
    """The control characters (newline, tab, escape, ...) in user text that must stay one line."""
    return sorted({repr(c) for c in text if ord(c) < 32 or ord(c) == 127})


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
DEFAULT_VENV = "~/mllm-venv"
ENV_ON_WORKER = "~/.env"
"""Where `mllm env push` puts the secrets by default; `~` is the login user's home (root, or another --user)."""
INSTALL_RECORD = "mllm-install.json"
"""In the venv: what `mllm bootstrap` installed there."""
BUCKET_PROBE_PREFIX = ".mllm-probe-"
"""`python -m mllm_jax bucket-probe gs://B/P` writes, reads back and deletes B/P/.mllm-probe-<random>
(`mllm launch --bucket` runs it on worker 0 first); its answer is one JSON line, `BucketProbe`."""
BUCKET_PROBE_TIMEOUT_SEC = 60
"""The probe gives up (status null) after this long, e.g. when GCS cannot be reached."""


class BucketProbe(TypedDict):
    ok: bool
    status: int | None
    """The HTTP status of the failed call (403: no permission, 404: no such bucket); null when none."""
    error: str
    """What failed, GCS's own message included ("" when ok)."""

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


# -- run_summary.json --------------------------------------------------------------------------------
class _SummaryAlways(TypedDict):
    """Keys every run_summary.json has, whatever ended the run."""

    status: Literal["running", "completed", "stopped", "failed"]
    recipe: str
    run_dir: str
    config_path: str | None
    config_hash: str
    """Of the settings only (not output_dir): equal settings, equal hash."""
    git: dict[str, Any]
    """`commit`, `dirty` of the code that ran."""
    versions: dict[str, str | None]
    """python, jax, jaxlib, flax, optax, orbax-checkpoint, wandb."""
    backend: str
    device_kind: str
    device_count: int
    local_device_count: int
    process_count: int
    mesh: dict[str, int]
    recoveries: int
    """Times the run was resumed on a recreated VM by `mllm watch` (from $MLLM_RECOVERIES)."""
    started_at: str
    finished_at: str
    wall_time_sec: float
    eval_losses: list[dict[str, float]]
    """`[{step, loss}]`."""
    best_eval_loss: dict[str, float] | None
    checkpoint_dir: str
    latest_checkpoint_step: int | None
    wandb: dict[str, Any]
    """`{mode, url}` online, `{mode, dir, sync_command}` offline, `{mode}` disabled."""


class RunSummary(_SummaryAlways, total=False):
    """run_summary.json, written by process 0 at the end (also on failure or stop): the trainer
    fills it, the launcher reads it, docs/contracts.md points here. A recipe adds its own keys
    beside these (`NanoGPTSummary`, `SftSummary`)."""

    error: str
    traceback: str
    final_step: int
    final_train_loss: float
    last_eval_step: int | None
    tokens_per_sec: float
    """Tokens computed on (padding included), the compiling first step excluded."""
    step_time_sec: float
    mfu: float
    step_time_stats: dict[str, float]
    """`timed_steps`, `intervals`, `mean`, `median`, `min`, `max` seconds per step."""
    eval_metrics: dict[str, float]
    """The latest evaluation: `eval/loss`, and for sft `eval/hr@K`, `eval/ndcg@K`, ..."""
    best_checkpoint: dict[str, Any]
    """With train.load_best_model_at_end or train.early_stopping_patience: `metric`, the `step` and
    `value` of its best evaluation, and `dir` (the saved parameters) with load_best_model_at_end."""
    early_stopped_at: int
    """The step at which train.early_stopping_patience ended the run."""
    step_memory: dict[str, int]
    """Bytes per device of the compiled train step (XLA's memory_analysis, as preflight reports
    it): `argument`, `output`, `alias`, `temp`, `generated_code`, `peak`; with `device_kind`
    and `hbm_share` (peak / the chip's HBM) on a TPU."""


class NanoGPTSummary(TypedDict, total=False):
    num_params: int
    vocab_size: int
    sample: str


class SftSummary(TypedDict, total=False):
    base_model: str
    num_params: int
    token_extension: dict[str, Any]
    run_mode: str
    train_examples: int
    test_prompts: int
    eval_examples: int
    seq_len: int
    effective_batch: dict[str, int]
    steps_per_epoch: int
    max_steps: int
    hf_export_dir: str


class RlSummary(TypedDict, total=False):
    base_model: str
    num_params: int
    token_extension: dict[str, Any]
    algorithm: str
    train_prompts: dict[str, int]
    """Prompts per RL task."""
    test_prompts: int
    prompt_len: int
    """Tokens every prompt is left-padded to (the longest, rounded up to 64)."""
    effective_batch: dict[str, int]
    steps_per_epoch: int
    max_steps: int
    updates: int
    """Optimizer updates: max_steps x rl.num_iterations."""
    hf_export_dir: str


def cache_dir() -> Path:
    """Where the trainer caches what it downloads or computes once (Tiny Shakespeare, libtpu,
    preflight reports): $XDG_CACHE_HOME/mllm_jax, by default ~/.cache/mllm_jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mllm_jax"
