"""Where metrics go: `metrics.jsonl` in the run dir, W&B, and the console.

Only process 0 tracks; the other processes get a Tracker that does nothing, so callers
never branch on the process index.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mllm_jax.config import ConfigError
from mllm_jax.contracts import METRICS_FILE


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online: stream to W&B (needs WANDB_API_KEY or a netrc login); offline: write a local
    run under <run dir>/wandb to upload later with `wandb sync`; disabled: no W&B."""
    project: str = "mllm-jax"
    entity: str | None = None
    """W&B team or user; None = the API key's default entity."""
    name: str | None = None
    """Display name; None = the run directory's name."""
    tags: list[str] = field(default_factory=list)


def check_wandb_credentials(cfg: WandbConfig) -> None:
    """Fail before any compute when online mode has no way to authenticate."""
    if cfg.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    raise ConfigError(
        "wandb.mode is online but no W&B credentials were found: set WANDB_API_KEY "
        "(e.g. in .env) or run `wandb login`, or use wandb.mode=offline"
    )


class Tracker:
    """Appends metric events to metrics.jsonl and mirrors them to W&B (process 0 only)."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, config: dict[str, Any], active: bool,
                 resume_step: int | None = None, resume_history: list[dict[str, Any]] | None = None):
        """On resume, the events up to `resume_step` are kept: `resume_history` (saved with the
        checkpoint) when given, else the run dir's own metrics.jsonl."""
        self.active = active
        self.path = run_dir / METRICS_FILE
        self.history: list[dict[str, Any]] = []
        self.run = None
        self.cfg = cfg
        if not active:
            return
        if resume_step is not None and (resume_history is not None or self.path.exists()):
            # Events after the checkpoint are replayed by the resumed run: drop the old ones.
            events = resume_history if resume_history is not None else [
                json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.history = [e for e in events if e["step"] <= resume_step]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(e) + "\n" for e in self.history))
        if cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                id=_wandb_id(run_dir.name),
                resume="allow",
                tags=cfg.tags,
                mode=cfg.mode,
                dir=str(run_dir.absolute()),
                config=config,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        event = {"step": step, "time": round(time.time(), 3), **metrics}
        self.history.append(event)
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def values(self, name: str) -> list[tuple[int, float]]:
        """Every (step, value) logged under `name`, in order."""
        return [(e["step"], e[name]) for e in self.history if name in e]

    def wandb_summary(self) -> dict[str, Any]:
        """Where this run lives in W&B: its URL (online) or its offline dir and sync command."""
        if self.run is None:
            return {"mode": self.cfg.mode}
        if self.cfg.mode == "online":
            return {"mode": "online", "url": self.run.url}
        offline_dir = str(Path(self.run.dir).parent)
        return {"mode": "offline", "dir": offline_dir, "sync_command": f"wandb sync {offline_dir}"}

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _wandb_id(run_name: str) -> str:
    """A W&B run id derived from the run dir, so that --resume continues the same W&B run."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_name)[-64:]


class Console:
    """One line per log step on stdout, plus a rich progress bar when stdout is a terminal."""

    def __init__(self, total_steps: int, start_step: int, active: bool):
        self.active = active
        self.progress = None
        if not active:
            return
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
            self.progress.start()

    def print(self, line: str) -> None:
        if not self.active:
            return
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
