"""What the launcher does on a worker once connected: push the env file, set up Python, report
versions. Plain functions over `ssh.Connections`, one worker at a time (callers fan out)."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
from pathlib import Path

from dotenv import dotenv_values

from launcher import ssh
from launcher.errors import LauncherError

# Where the chosen interpreter is recorded on each worker by `mllm bootstrap`.
PYTHON_RECORD = "~/.mllm/python"
DEFAULT_VENV = "/root/mllm-venv"
PROJECT_DEPS = ["flax", "optax", "orbax-checkpoint", "wandb", "pyyaml", "python-dotenv", "rich", "typer"]


def remote_python() -> str:
    """Shell snippet for the interpreter bootstrap chose (python3 before any bootstrap)."""
    return f'"$(cat {PYTHON_RECORD} 2>/dev/null || echo python3)"'


def normalized_env(path: Path) -> tuple[bytes, list[str]]:
    """The env file with CRs and trailing blanks stripped, and its key names (values unread)."""
    if not path.is_file():
        raise LauncherError(f"--src {path}: env file not found")
    lines = [line.rstrip() for line in path.read_text().replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines).strip("\n") + "\n"
    keys = [k for k, v in dotenv_values(stream=io.StringIO(text), interpolate=False).items() if v is not None]
    if not keys:
        raise LauncherError(f"--src {path}: no KEY=VALUE lines")
    return text.encode(), keys


def push_env(conns: ssh.Connections, w: ssh.Worker, content: bytes, dest: str) -> None:
    """Write the env file over SFTP with mode 0600 (never via a command line), then verify it."""
    sftp = conns.client(w).open_sftp()
    try:
        tmp = f"{dest}.mllm-tmp"
        with sftp.open(tmp, "wb") as f:
            f.chmod(0o600)
            f.write(content)
        sftp.posix_rename(tmp, dest)
        sftp.chmod(dest, 0o600)
        with sftp.open(dest, "rb") as f:
            back = f.read()
        mode = sftp.stat(dest).st_mode & 0o777
    finally:
        sftp.close()
    if hashlib.sha256(back).digest() != hashlib.sha256(content).digest() or mode != 0o600:
        raise LauncherError(f"worker {w.index}: {dest} did not verify after writing (mode {mode:o})")


VERSIONS_SCRIPT = r"""
import json, platform, importlib.metadata as md
out = {"python": platform.python_version(), "os": platform.platform(terse=True), "kernel": platform.release()}
for d in ("jax", "jaxlib", "flax", "optax", "wandb"):
    try: out[d] = md.version(d)
    except md.PackageNotFoundError: out[d] = None
try:
    import jax
    out["backend"], out["device_count"] = jax.default_backend(), jax.device_count()
except Exception as e:
    out["backend"], out["device_count"] = "error: " + type(e).__name__, 0
print("MLLM_VERSIONS " + json.dumps(out))
"""


def versions(conns: ssh.Connections, w: ssh.Worker) -> dict:
    code, out = ssh.capture(conns, w, f"{remote_python()} -c {shlex.quote(VERSIONS_SCRIPT)}")
    for line in out.splitlines():
        if line.startswith("MLLM_VERSIONS "):
            return json.loads(line[len("MLLM_VERSIONS "):])
    raise LauncherError(f"worker {w.index}: could not read versions (exit {code}): {out.strip()[-300:]}")


def bootstrap(conns: ssh.Connections, w: ssh.Worker, venv: str, python: str | None) -> str:
    """Make `python -m mllm_jax` runnable: use `python` as given, or create/refresh a venv with
    jax[tpu] (TPU worker) or jax plus the project's dependencies. Skips what is already there.
    Records the interpreter in ~/.mllm/python and returns it."""
    say = lambda msg: ssh.emit(w.label, msg)  # noqa: E731
    if python:
        code, out = ssh.capture(conns, w, f"{shlex.quote(python)} -c 'import sys; print(sys.version)'")
        if code:
            raise LauncherError(f"worker {w.index}: --python {python} does not run: {out.strip()[-200:]}")
        interpreter = python
        say(f"using existing interpreter {python}")
    else:
        interpreter = f"{venv}/bin/python"
        q = shlex.quote(venv)
        code, _ = ssh.capture(conns, w, f"test -x {q}/bin/python")
        if code:
            say(f"creating venv {venv}")
            _checked(conns, w, f"python3 -m venv {q}")
        code, _ = ssh.capture(conns, w, f"{q}/bin/python -c 'import jax, flax, optax, orbax.checkpoint, wandb, yaml, dotenv, rich, typer'")
        if code:
            jax_pkg = "'jax[tpu]'" if _has_tpu(conns, w) else "jax"
            say(f"installing {jax_pkg.strip(chr(39))} and the project's dependencies")
            _checked(conns, w, f"{q}/bin/pip install -q --upgrade pip && {q}/bin/pip install -q {jax_pkg} "
                               + " ".join(PROJECT_DEPS))
        else:
            say("venv already has jax and the project's dependencies")
    _checked(conns, w, f"mkdir -p ~/.mllm && printf '%s\\n' {shlex.quote(interpreter)} > {PYTHON_RECORD}")
    return interpreter


def _has_tpu(conns: ssh.Connections, w: ssh.Worker) -> bool:
    code, _ = ssh.capture(conns, w, "ls /dev/accel0 /dev/vfio/0 >/dev/null 2>&1")
    return code == 0


def _checked(conns: ssh.Connections, w: ssh.Worker, command: str) -> None:
    code, out = ssh.capture(conns, w, command)
    if code:
        raise LauncherError(f"worker {w.index}: `{command}` failed (exit {code}): {out.strip()[-300:]}")
