"""Bring a run's results home and keep a local index of runs (`mllm fetch-summary`, `mllm runs`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launcher import state
from launcher.errors import LauncherError
from launcher.jobs import Target, run_path
from mllm_jax.contracts import CONFIG_FILE, METRICS_FILE, RUNS_DIR, SUMMARY_FILE

FETCHED = (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)


def fetch(t: Target, run_id: str, dest: Path) -> dict[str, Any]:
    """Copy the run's summary, resolved config and metrics into dest/<run id>/; returns the summary.

    The local path comes from the validated run id alone (never from the worker), and nothing is
    created until the summary has arrived and parsed."""
    run = run_path(run_id)
    if dest.exists() and not dest.is_dir():
        raise LauncherError(f"--dest {dest}: exists and is not a directory")
    texts: dict[str, str] = {}
    for name in FETCHED:
        code, text = t.sh(f"cat {t.repo}/{run}/{name}")
        if code == 0:
            texts[name] = text + ("\n" if text and not text.endswith("\n") else "")
        elif name == SUMMARY_FILE:
            raise LauncherError(f"{t.label}: {run}/{SUMMARY_FILE} not found (is the run still starting?)")
    summary = parse_summary(texts[SUMMARY_FILE], f"{t.label}: {run}/{SUMMARY_FILE}")
    out_dir = dest / run_id
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out_dir / name).write_text(text)
    except OSError as e:
        raise LauncherError(f"--dest {dest}: cannot write {e.filename or out_dir} ({e.strerror})") from None
    return summary


def read_local(run_id: str, runs_dir: Path = Path(RUNS_DIR)) -> dict[str, Any]:
    """A local run's summary (its files are already here)."""
    run_path(run_id)  # one safe path component, or a one-line error
    path = Path(runs_dir) / run_id / SUMMARY_FILE
    try:
        text = path.read_text()
    except OSError:
        raise LauncherError(f"{path}: not found (is the run still starting, or is the run id wrong?)") from None
    return parse_summary(text, str(path))


def parse_summary(text: str, where: str) -> dict[str, Any]:
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise LauncherError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(summary, dict):
        raise LauncherError(f"{where}: expected a JSON object")
    return summary


def _index_path() -> Path:
    return state.STATE_DIR / "runs.json"


def record(run_id: str, summary: dict[str, Any], vm: str | None, zone: str | None, dest: Path) -> dict[str, Any]:
    """Add or update the run in the local index."""
    best = summary.get("best_eval_loss") or {}
    evals = summary.get("eval_losses") or []
    entry = {
        "run": run_id,
        "vm": vm or "local",
        "zone": zone,
        "recipe": summary.get("recipe"),
        "commit": (summary.get("git") or {}).get("commit"),
        "status": summary.get("status"),
        "final_step": summary.get("final_step"),
        "eval_loss": evals[-1]["loss"] if evals else None,
        "best_eval_loss": best.get("loss"),
        "wandb": summary.get("wandb", {}).get("url") or summary.get("wandb", {}).get("sync_command"),
        "recoveries": summary.get("recoveries", 0),
        "dest": str(dest / run_id),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = load_index()
    index[run_id] = entry
    state.ensure_dir()
    _index_path().write_text(json.dumps(index, indent=2) + "\n")
    return entry


def mark(run_id: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the run's index entry (one with the shown keys unset when there is
    none yet): the supervisor's status and recoveries between fetches."""
    index = load_index()
    entry = index.get(run_id) or {"run": run_id, "vm": None, "recipe": None, "commit": None, "status": None,
                                  "eval_loss": None, "wandb": None}
    entry.update(fields)
    index[run_id] = entry
    state.ensure_dir()
    _index_path().write_text(json.dumps(index, indent=2) + "\n")
    return entry


def load_index() -> dict[str, dict[str, Any]]:
    """Run id -> index entry (as `record` writes them); a file of another shape is a
    LauncherError naming it."""
    index = state.read_json_object(_index_path())
    shown = {"run", "vm", "recipe", "commit", "status", "eval_loss", "wandb"}  # what `mllm runs` prints
    for run_id, entry in index.items():
        if not isinstance(entry, dict) or not shown <= entry.keys():
            raise LauncherError(f"{_index_path()}: entry {run_id!r} is not a run record; fix or delete the file")
    return index


def describe(run_id: str, summary: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """`mllm fetch-summary`'s lines: outcome, losses, commit, W&B, where it was saved."""
    lines = [f"{run_id}: {summary.get('status')} at step {summary.get('final_step')}, "
             f"final train loss {summary.get('final_train_loss')}, eval loss {entry['eval_loss']} "
             f"(best {entry['best_eval_loss']}), commit {str(entry['commit'])[:12]}, "
             f"{summary.get('process_count')} process(es)"]
    w = summary.get("wandb") or {}
    if w.get("url"):
        lines.append(f"W&B: {w['url']}")
    elif w.get("sync_command"):
        lines.append(f"W&B offline run: {w['dir']} (upload with `{w['sync_command']}`)")
    lines.append(f"saved to {entry['dest']}")
    return lines
