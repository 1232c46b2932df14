"""Bring a run's results home and keep a local index of runs (`mllm fetch-summary`, `mllm runs`)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from launcher import state
from launcher.errors import LauncherError
from launcher.jobs import Target
from mllm_jax.contracts import CONFIG_FILE, METRICS_FILE, RUNS_DIR, SUMMARY_FILE

FETCHED = (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)


def fetch(t: Target, run_id: str, dest: Path) -> dict[str, Any]:
    """Copy the run's summary, resolved config and metrics into dest/<run id>/; returns the summary."""
    out_dir = dest / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FETCHED:
        code, text = t.sh(f"cat {t.repo}/{RUNS_DIR}/{shlex.quote(run_id)}/{name}")
        if code:
            if name == SUMMARY_FILE:
                raise LauncherError(f"{t.label}: {RUNS_DIR}/{run_id}/{SUMMARY_FILE} not found (is the run still starting?)")
            continue
        (out_dir / name).write_text(text + ("\n" if text and not text.endswith("\n") else ""))
    return json.loads((out_dir / SUMMARY_FILE).read_text())


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
        "dest": str(dest / run_id),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = load_index()
    index[run_id] = entry
    state.ensure_dir()
    _index_path().write_text(json.dumps(index, indent=2) + "\n")
    return entry


def load_index() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_index_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


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
