"""Remembered defaults (last VM, zone, project, bucket, SSH proxy) in a git-ignored `.mllm/` dir next to the repo,
so that later commands may omit `--vm/--zone/--project`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import LauncherError

STATE_DIR = Path(".mllm")
_ENV = {"vm": "MLLM_VM", "zone": "MLLM_ZONE", "project": "MLLM_PROJECT", "bucket": "MLLM_BUCKET",
        "ssh_proxy": "MLLM_SSH_PROXY"}


def _path() -> Path:
    return STATE_DIR / "state.json"


def read_json_object(path: Path) -> dict:
    """A JSON object file of the state dir ({} when it does not exist); garbage or another
    shape is a LauncherError naming the file, which the user can fix or delete."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        why = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise LauncherError(f"{path}: {why}; fix or delete it") from None
    if not isinstance(data, dict):
        raise LauncherError(f"{path}: expected a JSON object, got {type(data).__name__}; fix or delete it")
    return data


def load() -> dict[str, str]:
    """The remembered values: a JSON object of vm / zone / project strings."""
    data = read_json_object(_path())
    for key, value in data.items():
        if key in _ENV and not isinstance(value, str):
            raise LauncherError(f"{_path()}: {key} must be a string, got {value!r}; fix or delete it")
    return data


def ensure_dir() -> Path:
    """The state dir, created on first use; it ignores itself so that git never picks it up."""
    STATE_DIR.mkdir(exist_ok=True)
    (STATE_DIR / ".gitignore").write_text("*\n")
    return STATE_DIR


def remember(**values: str | None) -> None:
    state = load()
    state.update({k: v for k, v in values.items() if v})
    ensure_dir()
    _write(state)


def _write(state: dict) -> None:
    write_json(_path(), state)


def write_json(path: Path, data: object) -> None:
    """A JSON file of the state dir, whole or not at all: a kill mid-write keeps the old one."""
    ensure_dir()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


CREATED = "created"
"""The state key listing the VMs this directory's `mllm vm create` made (project/zone/name): the
only ones a supervisor deletes at the end of a run without being told to."""


def mark_created(project: str, zone: str, name: str) -> None:
    state = load()
    made = [m for m in state.get(CREATED, []) if isinstance(m, str)]
    state[CREATED] = [*dict.fromkeys([*made, f"{project}/{zone}/{name}"])][-200:]
    ensure_dir()
    _write(state)


def created(project: str, zone: str, name: str) -> bool:
    """Whether `mllm vm create` (from here) made this VM."""
    return f"{project}/{zone}/{name}" in (load().get(CREATED) or [])


def resolve(key: str, given: str | None, flag: str, required: bool = True) -> str | None:
    """A flag value, else its environment variable, else the remembered value."""
    value = given or os.environ.get(_ENV[key]) or load().get(key)
    if required and not value:
        raise LauncherError(f"{flag} is required (or set {_ENV[key]}); no earlier value is remembered")
    return value
