"""What comes back from a worker (or a file the user did not write) before the laptop uses it:
bounded in bytes and time, from regular files only, checked into typed values, and printable.

A worker may be confused or compromised: its `run_summary.json` may be a FIFO (a read that never
ends), a link to /dev/zero (one that never stops), a JSON of the wrong types, or text full of
terminal escapes (OSC 52 writes the user's clipboard). Every read of a worker's file goes through
`read_file`; every string from a worker or an API that reaches the terminal goes through
`printable`.
"""

from __future__ import annotations

import math
import re
import stat
from pathlib import Path
from typing import Any

from launcher.errors import LauncherError

READ_TIMEOUT_SEC = 60
"""At most this long for one file read on a worker."""
SUMMARY_MAX_BYTES = 4 << 20
CONFIG_MAX_BYTES = 4 << 20
METRICS_MAX_BYTES = 256 << 20
LOG_MAX_BYTES = 32 << 20
"""`mllm logs` shows at most this much of the end of a log (the file may be any size)."""
SMALL_MAX_BYTES = 4096
"""An exit file, a link: a line."""
NOT_REGULAR = 3
"""read_script's exit code for a path that is not a regular file (a FIFO, a device, a link to one)."""
MISSING = 4
"""read_script's exit code for a path that does not exist."""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters other than tab and newline shown as `\\xNN`: a worker's or an API's
    text never drives the terminal (escape sequences, window titles, clipboard writes, clears)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def read_script(path: str, limit: int, tail: bool = False) -> str:
    """A POSIX shell snippet printing at most `limit` bytes of the file at `path` (shell syntax,
    already quoted), its start or (`tail`) its end, within READ_TIMEOUT_SEC; it exits NOT_REGULAR
    for anything but a regular file, so a FIFO or a link to a device is never opened."""
    return (f"[ -e {path} ] || exit {MISSING}\n[ -f {path} ] && [ ! -p {path} ] || exit {NOT_REGULAR}\n"
            f"exec timeout {READ_TIMEOUT_SEC} {'tail' if tail else 'head'} -c {int(limit)} {path}")


def read_local(path: Path, limit: int, what: str) -> str:
    """A local file's text (a regular file only, at most `limit` bytes); one line otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise LauncherError(f"{what}: not found") from None
    if not stat.S_ISREG(mode):
        raise LauncherError(f"{what}: not a regular file")
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LauncherError(f"{what}: larger than {limit:,} bytes")
    return data.decode(errors="replace")


# -- typed values ------------------------------------------------------------------------------


def number(value: Any, where: str, *, optional: bool = True) -> float | None:
    """A finite number (not a bool, not a string), or None where allowed."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LauncherError(f"{where}: expected a finite number, got {printable(repr(value))[:80]}")
    return float(value)


def integer(value: Any, where: str, *, optional: bool = True, minimum: int | None = None) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise LauncherError(f"{where}: expected an integer{bound}, got {printable(repr(value))[:80]}")
    return value


def text(value: Any, where: str, *, optional: bool = True, limit: int = 2000) -> str | None:
    """A string without control characters (shown as one line), or None where allowed."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or _CONTROL.search(value) or "\n" in value:
        raise LauncherError(f"{where}: expected one line of text, got {printable(repr(value))[:80]}")
    return value


def mapping(value: Any, where: str, *, optional: bool = True) -> dict[str, Any]:
    """A JSON object ({} for None where allowed)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise LauncherError(f"{where}: expected an object, got {printable(repr(value))[:80]}")
    return value


def summary_fields(summary: dict[str, Any], where: str) -> dict[str, Any]:
    """What the laptop uses of a run summary, each field checked: the run index stores only
    these, so one bad summary cannot break `mllm runs` later."""
    evals = summary.get("eval_losses")
    if evals is not None and not isinstance(evals, list):
        raise LauncherError(f"{where}: eval_losses: expected a list, got {printable(repr(evals))[:80]}")
    last_eval = None
    if evals:
        last = mapping(evals[-1], f"{where}: eval_losses[-1]", optional=False)
        last_eval = number(last.get("loss"), f"{where}: eval_losses[-1].loss")
    best = mapping(summary.get("best_eval_loss"), f"{where}: best_eval_loss")
    wandb = mapping(summary.get("wandb"), f"{where}: wandb")
    git = mapping(summary.get("git"), f"{where}: git")
    return {
        "recipe": text(summary.get("recipe"), f"{where}: recipe"),
        "status": text(summary.get("status"), f"{where}: status"),
        "final_step": integer(summary.get("final_step"), f"{where}: final_step", minimum=0),
        "final_train_loss": number(summary.get("final_train_loss"), f"{where}: final_train_loss"),
        "eval_loss": last_eval,
        "best_eval_loss": number(best.get("loss"), f"{where}: best_eval_loss.loss"),
        "commit": text(git.get("commit"), f"{where}: git.commit"),
        "process_count": integer(summary.get("process_count"), f"{where}: process_count", minimum=1),
        "wandb_url": text(wandb.get("url"), f"{where}: wandb.url"),
        "wandb_sync": text(wandb.get("sync_command"), f"{where}: wandb.sync_command"),
        "wandb_dir": text(wandb.get("dir"), f"{where}: wandb.dir"),
        "recoveries": integer(summary.get("recoveries", 0), f"{where}: recoveries", optional=False, minimum=0),
    }
