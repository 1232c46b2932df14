"""Bring a run's results home and keep a local index of runs (`mllm fetch-summary`, `mllm runs`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launcher import readback, state
from launcher.errors import LauncherError
from launcher.jobs import Target, run_path
from mllm_jax.contracts import CONFIG_FILE, METRICS_FILE, RUNS_DIR, SUMMARY_FILE

FETCHED = {SUMMARY_FILE: readback.SUMMARY_MAX_BYTES, CONFIG_FILE: readback.CONFIG_MAX_BYTES,
           METRICS_FILE: readback.METRICS_MAX_BYTES}
"""What fetch-summary brings home, and at most how many bytes of each."""


def fetch(t: Target, run_id: str, dest: Path) -> dict[str, Any]:
    """Copy the run's summary, resolved config and metrics into dest/<run id>/; returns the summary.

    The local path comes from the validated run id alone (never from the worker), and nothing is
    created until the summary has arrived and parsed."""
    run = run_path(run_id)
    if dest.exists() and not dest.is_dir():
        raise LauncherError(f"--dest {dest}: exists and is not a directory")
    texts: dict[str, str] = {}
    for name, limit in FETCHED.items():
        code, text = t.sh(readback.read_script(f"{t.repo}/{run}/{name}", limit + 1))
        if code == 0 and len(text.encode()) > limit:
            raise LauncherError(f"{t.label}: {run}/{name} is larger than {limit:,} bytes; not fetched")
        if code == 0:
            texts[name] = text + ("\n" if text and not text.endswith("\n") else "")
        elif name == SUMMARY_FILE:
            why = "not a regular file" if code == readback.NOT_REGULAR else "not found (is the run still starting?)"
            raise LauncherError(f"{t.label}: {run}/{SUMMARY_FILE} {why}")
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
    return parse_summary(readback.read_local(path, readback.SUMMARY_MAX_BYTES, str(path)), str(path))


def parse_summary(text: str, where: str) -> dict[str, Any]:
    """The summary, with the fields the laptop uses checked (readback.summary_fields)."""
    try:
        summary = json.loads(text, parse_constant=lambda c: c)  # NaN/Infinity stay strings: refused below
    except json.JSONDecodeError as e:
        raise LauncherError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(summary, dict):
        raise LauncherError(f"{where}: expected a JSON object")
    readback.summary_fields(summary, where)
    return summary


def _index_path() -> Path:
    return state.STATE_DIR / "runs.json"


def record(run_id: str, summary: dict[str, Any], vm: str | None, zone: str | None, dest: Path) -> dict[str, Any]:
    """Add or update the run in the local index."""
    f = readback.summary_fields(summary, f"run {run_id}'s summary")
    entry = {
        "run": run_id,
        "vm": vm or "local",
        "zone": zone,
        "recipe": f["recipe"],
        "commit": f["commit"],
        "status": f["status"],
        "final_step": f["final_step"],
        "eval_loss": f["eval_loss"],
        "best_eval_loss": f["best_eval_loss"],
        "wandb": f["wandb_url"] or f["wandb_sync"],
        "recoveries": f["recoveries"],
        "dest": str(dest / run_id),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = state.read_json_object(_index_path())  # bad entries kept as they are, not dropped
    index[run_id] = entry
    state.write_json(_index_path(), index)
    return entry


def mark(run_id: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the run's index entry (one with the shown keys unset when there is
    none yet): the supervisor's status and recoveries between fetches."""
    index = state.read_json_object(_index_path())
    entry = load_index().get(run_id) or {"run": run_id, "vm": None, "recipe": None, "commit": None, "status": None,
                                         "eval_loss": None, "wandb": None}
    entry.update(fields)
    index[run_id] = entry
    state.write_json(_index_path(), index)
    return entry


def load_index(skipped: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run id -> index entry (as `record` writes them). An entry of another shape (a file edited
    by hand, an older bug) is left out, its reason appended to `skipped`: one bad entry never
    makes the index unusable. A file that is not a JSON object is a LauncherError naming it."""
    index = state.read_json_object(_index_path())
    good = {}
    for run_id, entry in index.items():
        try:
            _check_entry(run_id, entry)
        except LauncherError as e:
            (skipped if skipped is not None else []).append(str(e))
            continue
        good[run_id] = entry
    return good


def _check_entry(run_id: str, entry: Any) -> None:
    where = f"{_index_path()}: entry {readback.printable(run_id)[:80]!r}"
    entry = readback.mapping(entry, where, optional=False)
    for key in ("run", "vm", "recipe", "commit", "status", "wandb"):  # what `mllm runs` prints
        if key not in entry:
            raise LauncherError(f"{where}: no {key}")
        readback.text(entry[key], f"{where}.{key}")
    readback.number(entry.get("eval_loss"), f"{where}.eval_loss")
    readback.integer(entry.get("recoveries", 0), f"{where}.recoveries", optional=False, minimum=0)


def describe(run_id: str, summary: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """`mllm fetch-summary`'s lines: outcome, losses, commit, W&B, where it was saved."""
    f = readback.summary_fields(summary, f"run {run_id}'s summary")
    lines = [f"{run_id}: {f['status']} at step {f['final_step']}, "
             f"final train loss {f['final_train_loss']}, eval loss {entry['eval_loss']} "
             f"(best {entry['best_eval_loss']}), commit {str(entry['commit'])[:12]}, "
             f"{f['process_count']} process(es)"]
    if f["wandb_url"]:
        lines.append(f"W&B: {f['wandb_url']}")
    elif f["wandb_sync"]:
        lines.append(f"W&B offline run: {f['wandb_dir']} (upload with `{f['wandb_sync']}`)")
    lines.append(f"saved to {entry['dest']}")
    return lines
