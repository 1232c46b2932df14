"""Facts about a run that do not come from training: code version, library versions, hardware."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_info(repo: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit of the code that runs, and whether the working tree differs from it."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if commit else None}


def versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(),
            **{name: version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "wandb")}}


def hardware(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh": dict(mesh.shape),
    }
