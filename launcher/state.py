"""Remembered defaults (last VM, zone, project) in a git-ignored `.mllm/` dir next to the repo,
so that later commands may omit `--vm/--zone/--project`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import LauncherError

STATE_DIR = Path(".mllm")
_ENV = {"vm": "MLLM_VM", "zone": "MLLM_ZONE", "project": "MLLM_PROJECT"}


def _path() -> Path:
    return STATE_DIR / "state.json"


def load() -> dict[str, str]:
    try:
        return json.loads(_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def ensure_dir() -> Path:
    """The state dir, created on first use; it ignores itself so that git never picks it up."""
    STATE_DIR.mkdir(exist_ok=True)
    (STATE_DIR / ".gitignore").write_text("*\n")
    return STATE_DIR


def remember(**values: str | None) -> None:
    state = load()
    state.update({k: v for k, v in values.items() if v})
    ensure_dir()
    _path().write_text(json.dumps(state, indent=2) + "\n")


def resolve(key: str, given: str | None, flag: str, required: bool = True) -> str | None:
    """A flag value, else its environment variable, else the remembered value."""
    value = given or os.environ.get(_ENV[key]) or load().get(key)
    if required and not value:
        raise LauncherError(f"{flag} is required (or set {_ENV[key]}); no earlier value is remembered")
    return value
