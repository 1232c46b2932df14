"""Preflight from the laptop: the trainer's `python -m mllm_jax preflight` in a child process
(it imports JAX and libtpu; the launcher does neither), and the gate `mllm launch` passes
before it touches a VM: a config that cannot fit the VM's chips is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from launcher import ssh
from launcher.errors import LauncherError
from mllm_jax import preflight as trainer_preflight
from mllm_jax.config import ConfigError


def run(recipe: str, config: str | None, overrides: list[str], accelerator_type: str,
        use_cache: bool = True, estimate: bool = True) -> dict[str, Any]:
    """The preflight report (mllm_jax.preflight.run's) of this config for `accelerator_type`,
    computed in a child process in the current directory (the config's relative paths resolve
    as for a local run). Bad input, or no libtpu for this machine, is a LauncherError."""
    argv = [sys.executable, "-m", "mllm_jax", "preflight", recipe, "--type", accelerator_type, "--json"]
    if config is not None:
        argv += ["--config", str(Path(config).absolute())]
    for item in overrides:
        argv += ["--set", item]
    if not use_cache:
        argv.append("--no-cache")
    if not estimate:
        argv.append("--no-estimate")
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []

    def relay() -> None:  # progress lines ("installing libtpu ...") as they come; libtpu's noise kept back
        assert child.stderr is not None
        for line in child.stderr:
            if line.startswith("preflight: "):
                print(line.rstrip("\n"), file=sys.stderr, flush=True)
            elif line.strip():
                errors.append(line.rstrip("\n"))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    assert child.stdout is not None
    out = child.stdout.read()
    child.wait()
    reader.join()
    if child.returncode in (0, 1):
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            pass
    error = next((line for line in reversed(errors) if line.startswith("error: ")), None)
    if error and child.returncode == 2:
        raise LauncherError(error.removeprefix("error: "))
    raise LauncherError(f"preflight crashed (exit {child.returncode}): {(errors or ['no output'])[-1][:300]}")


def unavailable() -> str | None:
    """Why preflight cannot run on this machine (libtpu exists for Linux x86-64 only), or None."""
    try:
        trainer_preflight.check_platform()
    except ConfigError as e:
        return str(e)
    return None


def gate(recipe: str, config: str | None, overrides: list[str], accelerator_type: str) -> dict[str, Any] | None:
    """Before `mllm launch` touches a VM: preflight for its type; one line saying it fits, or
    LauncherError (exit 2) naming the HBM needed vs available and the knob to turn. Where
    libtpu cannot run, says so in one line and lets the launch go on (None). Memory only: the
    estimate's extra compiles would double the wait for nothing the gate uses."""
    why = unavailable()
    if why:
        ssh.emit("preflight", f"skipped: {why}")
        return None
    report = run(recipe, config, overrides, accelerator_type, estimate=False)
    if not report["fits"]:
        raise LauncherError(trainer_preflight.verdict(report) + " (or launch with --no-preflight)")
    ssh.emit("preflight", trainer_preflight.verdict(report) + (" [cached]" if report.get("cached") else ""))
    return report
