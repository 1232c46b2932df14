"""What the launcher does on a worker once connected: push the env file, set up Python, report
versions. Plain functions over `ssh.Connections`, one worker at a time (callers fan out)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata as md
import io
import json
import platform
import posixpath
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import dotenv_values

from launcher import ssh
from launcher.errors import LauncherError
from launcher.readback import printable
from mllm_jax.config import ConfigError
from mllm_jax.contracts import DEFAULT_VENV, INSTALL_RECORD, PYTHON_RECORD, REMOTE_REPO
from mllm_jax.config import read_text_file

if TYPE_CHECKING:
    from launcher import jobs  # jobs imports this module

DISTRIBUTION = "mllm-jax"  # this project on PyPI terms: its requirements are the workers' pins


def remote_python() -> str:
    """Shell snippet for the interpreter bootstrap chose (python3 before any bootstrap)."""
    return f'"$(cat {PYTHON_RECORD} 2>/dev/null || echo python3)"'


def normalized_env(path: Path) -> tuple[bytes, list[str]]:
    """The env file with CRs and trailing blanks stripped, and its key names (values unread)."""
    if not path.is_file():
        raise LauncherError(f"--src {path}: env file not found")
    try:
        raw = read_text_file(path)  # the trainer's reader: a binary file is refused the same way
    except ConfigError as e:
        raise LauncherError(f"--src {e}") from None
    lines = [line.rstrip() for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines).strip("\n") + "\n"
    keys = [k for k, v in dotenv_values(stream=io.StringIO(text), interpolate=False).items() if v is not None]
    if not keys:
        raise LauncherError(f"--src {path}: no KEY=VALUE lines")
    return text.encode(), keys


def push_env(conns: ssh.Connections, w: ssh.Worker, content: bytes, dest: str) -> None:
    """Write the env file over SFTP with mode 0600 (never via a command line), then verify it.
    A `dest` that cannot be written there (e.g. its directory is missing) is a LauncherError."""
    sftp = conns.client(w).open_sftp()
    tmp = f"{dest}.mllm-tmp"
    try:
        with sftp.open(tmp, "wb") as f:
            f.chmod(0o600)
            f.write(content)
        sftp.posix_rename(tmp, dest)
        sftp.chmod(dest, 0o600)
        with sftp.open(dest, "rb") as f:
            back = f.read()
        mode = sftp.stat(dest).st_mode & 0o777
    except OSError as e:
        with contextlib.suppress(OSError):
            sftp.remove(tmp)
        why = (f"no directory {posixpath.dirname(dest) or '.'}" if e.errno == errno.ENOENT
               else e.strerror or str(e))
        raise LauncherError(f"--dest {dest}: cannot write it on worker {w.index} ({why})") from None
    finally:
        sftp.close()
    if hashlib.sha256(back).digest() != hashlib.sha256(content).digest() or mode != 0o600:
        raise LauncherError(f"worker {w.index}: {dest} did not verify after writing (mode {mode:o})")


# What `mllm versions` compares between the laptop and the workers (distribution names).
VERSION_PACKAGES = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "wandb")

VERSIONS_SCRIPT = r"""
import json, platform, sys, importlib.metadata as md
out = {"python": platform.python_version(), "os": platform.platform(terse=True), "kernel": platform.release()}
for d in sys.argv[1:]:
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
    code, out = ssh.capture(conns, w, f"{remote_python()} -c {shlex.quote(VERSIONS_SCRIPT)} "
                                      + " ".join(VERSION_PACKAGES))
    for line in out.splitlines():
        if line.startswith("MLLM_VERSIONS "):
            try:
                found = json.loads(line[len("MLLM_VERSIONS "):])
            except ValueError:
                found = None
            if not isinstance(found, dict):
                raise LauncherError(f"worker {w.index}: its versions are not a JSON object: {line[14:][:100]}")
            # A worker's words, shown in a table: plain values, printable, bounded.
            return {printable(str(k))[:64]: v if isinstance(v, int) and not isinstance(v, bool)
                    else None if v is None else printable(str(v))[:200] for k, v in found.items()}
    raise LauncherError(f"worker {w.index}: could not read versions (exit {code}): {out.strip()[-300:]}")


def laptop_versions() -> dict:
    """This machine's python and packages, from metadata only (the launcher never imports JAX)."""
    out: dict = {"python": platform.python_version(), "os": platform.platform(terse=True), "kernel": platform.release()}
    for name in VERSION_PACKAGES:
        out[name] = installed_version(name)
    return out


def mismatches(laptop: dict, workers: dict[int, dict]) -> list[tuple[int, str]]:
    """(worker, field) where a worker differs from the laptop; python by major.minor, since the
    patch level does not change what installs or how it runs."""
    found = []
    for i, v in workers.items():
        for key in ("python", *VERSION_PACKAGES):
            mine, theirs = laptop.get(key), v.get(key)
            if key == "python":
                mine, theirs = _minor(mine), _minor(theirs)
            if key == "libtpu" and mine is None:
                continue  # a laptop has no TPU runtime; workers without one show None anyway
            if mine != theirs:
                found.append((i, key))
    return found


def versions_json(laptop: dict, found: dict[int, dict], diff: list[tuple[int, str]]) -> dict:
    return {"laptop": laptop, "workers": {str(i): v for i, v in found.items()},
            "mismatches": [{"worker": i, "field": f, "laptop": laptop.get(f), "worker_value": found[i].get(f)}
                           for i, f in diff]}


def versions_table(laptop: dict, found: dict[int, dict], diff: list[tuple[int, str]]) -> Any:
    """A rich Table: the laptop's row, then one per worker, ` *` on what differs from the laptop."""
    from rich.table import Table

    cols = ["python", *VERSION_PACKAGES, "backend", "device_count", "os", "kernel"]
    table = Table("machine", *cols)
    table.add_row("laptop", *[str(laptop.get(c, "")) for c in cols])
    for i, v in found.items():
        table.add_row(f"w{i}", *[f"{v.get(c)}{' *' if (i, c) in diff else ''}" for c in cols])
    return table


def _minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def installed_version(name: str) -> str | None:
    """One distribution's version on this laptop (None when it is not installed)."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# -- a bucket the job will write -----------------------------------------------------------------

def probe_bucket(t: jobs.Target, bucket: str, env_file: str | None, service_account: str | None) -> None:
    """Prove that `t` can write `bucket` (gs://B[/PREFIX]) before a job is started there: the
    trainer's `bucket-probe` runs where and as the job would (its repo, its interpreter, the same
    env file), so a VM whose service account cannot write the checkpoints is refused in one line
    now rather than failing after compute. LauncherError when it cannot."""
    from launcher import jobs  # here, not at import: jobs imports this module

    command = f"cd {t.repo} && {t.python} -m mllm_jax bucket-probe {shlex.quote(bucket)}"
    if env_file:
        command += f" --env-file {shlex.quote(env_file)}"
    code, out = t.sh(command)
    local = isinstance(t, jobs.LocalTarget)
    where = "this machine" if local else f"worker {t.index}"
    answer = _probe_answer(out)
    if answer is None:
        tail = _one_line(next((line for line in reversed(out.splitlines()) if line.strip()), "no output"))
        raise LauncherError(f"--bucket {bucket}: {where} could not check that it can write there "
                            f"(bucket-probe exited {code}: {tail})")
    if answer.get("ok") is True:
        ssh.emit(t.label, f"{bucket} is writable from here (a probe object written, read back and deleted)")
        return
    status, error = answer.get("status"), _one_line(str(answer.get("error") or "no reason given"))
    permission = re.search(r"Permission '([\w.]+)' denied|does not have ([\w.]+) access", error)
    if isinstance(status, int) and permission:
        detail = f"{status}: permission {permission.group(1) or permission.group(2)} denied"
    else:
        detail = f"{status}: {error}" if isinstance(status, int) else error
    who = ("with its own credentials" if local
           else f"as {service_account}" if service_account else "as the VM's default compute service account")
    hint = ""
    if status in (401, 403):
        hint = ("; grant your account roles/storage.objectUser on the bucket" if local else
                "; grant it roles/storage.objectUser on the bucket, or create the VM with --service-account")
    raise LauncherError(f"--bucket {bucket}: {where} cannot write it {who} ({detail}){hint}")


def _probe_answer(out: str) -> dict | None:
    """bucket-probe's JSON line in the command's output (other lines, e.g. warnings, ignored)."""
    for line in reversed(out.splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and "ok" in found:
            return found
    return None


def _one_line(text: str, limit: int = 300) -> str:
    """A worker's text, safe to print as part of one line: control characters replaced, bounded."""
    text = printable(" ".join(text.split("\n"))).strip()
    return text if len(text) <= limit else text[:limit] + "..."


# -- bootstrap ----------------------------------------------------------------------------------

@dataclass
class InstallOptions:
    """What the user chose for a worker's environment; recorded there so `mllm launch` can bring
    a stale environment up to date the same way."""

    venv: str = DEFAULT_VENV
    jax_version: str | None = None
    """jax and jaxlib (and through jax[tpu] libtpu) at this version instead of the laptop's."""
    python_version: str | None = None
    """The venv's Python (uv finds it on the worker or downloads it); default: the laptop's X.Y."""
    find_links: list[str] = field(default_factory=list)
    """Directories on the worker with wheels (uv's included), looked at before the index."""
    offline: bool = False
    """Install only from uv's cache and `find_links` on the worker (no index)."""
    index_url: str | None = None
    """A package index instead of PyPI (uv's and its own wheels)."""


def laptop_pins(jax_version: str | None) -> list[str]:
    """`name==version` for each of the project's own dependencies as installed on this laptop,
    so that the workers run what the laptop runs; jax/jaxlib from `jax_version` when given."""
    pins = {}
    for req in md.requires(DISTRIBUTION) or []:
        name, _, rest = req.partition(";")
        if "extra ==" in rest or "extra==" in rest:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
        version = installed_version(match.group(1)) if match else None
        if version:
            pins[match.group(1).lower()] = version
    if "jax" in pins and installed_version("jaxlib"):
        pins["jaxlib"] = installed_version("jaxlib")  # not a direct dependency, but jax needs its exact match
    if jax_version:
        pins["jax"] = pins["jaxlib"] = jax_version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def install_plan(options: InstallOptions, repo_dir: str = REMOTE_REPO) -> dict:
    """The JSON plan `worker_bootstrap.py` executes on each worker."""
    uv_version = installed_version("uv")
    if uv_version is None:
        raise LauncherError("uv is not installed on this machine (pip install uv): bootstrap pins the workers' uv to it")
    return {"repo": repo_dir, "venv": options.venv, "pins": laptop_pins(options.jax_version),
            "python_version": options.python_version or f"{sys.version_info[0]}.{sys.version_info[1]}",
            "find_links": options.find_links, "offline": options.offline, "index_url": options.index_url,
            "uv_version": uv_version, "record": INSTALL_RECORD, "options": asdict(options)}


def run_bootstrap(conns: ssh.Connections, w: ssh.Worker, plan: dict) -> dict:
    """Run worker_bootstrap.py on one worker (its progress printed `[wK]`-prefixed); its result."""
    source = (Path(__file__).with_name("worker_bootstrap.py")).read_text()
    result: dict = {}
    last: list[str] = []

    def line(text: str) -> None:
        if text.startswith("MLLM_BOOTSTRAP "):
            result.update(json.loads(text[len("MLLM_BOOTSTRAP "):]))
        else:
            ssh.emit(w.label, text)
            last[:] = [text]

    code = ssh.run(conns, w, f"python3 -c {shlex.quote(source)} {shlex.quote(json.dumps(plan))}", on_line=line)
    if result.get("state") == "error" or not result:
        why = result.get("error") or f"python3 exited {code} ({(last or ['no output'])[0].strip()[-200:]})"
        raise LauncherError(f"worker {w.index}: bootstrap failed: {why}")
    return result


def record_python(conns: ssh.Connections, w: ssh.Worker, interpreter: str) -> None:
    _checked(conns, w, f"mkdir -p ~/.mllm && printf '%s\\n' {shlex.quote(interpreter)} > {PYTHON_RECORD}")


def bootstrap(conns: ssh.Connections, w: ssh.Worker, options: InstallOptions, python: str | None) -> dict:
    """Make `python -m mllm_jax` runnable: `python` as given, or a venv holding the synced repo's
    pyproject (uv, pinned to the laptop's versions; a no-op when nothing changed). Records the
    interpreter in ~/.mllm/python; returns worker_bootstrap's result."""
    if python:
        code, out = ssh.capture(conns, w, f"{shlex.quote(python)} -c 'import sys; print(sys.version)'")
        if code:
            raise LauncherError(f"worker {w.index}: --python {python} does not run: {out.strip()[-200:]}")
        result = {"state": "existing", "python": python}
    else:
        result = run_bootstrap(conns, w, install_plan(options))
    record_python(conns, w, result["python"])
    return result


def describe_bootstrap(r: dict) -> str:
    """What bootstrap did on a worker, in words."""
    if r["state"] == "installed":
        return f"installed in {r['seconds']:.1f}s: {r['reason']}"
    if r["state"] == "up-to-date":
        return f"up to date, checked in {r['seconds']:.1f}s"
    return "existing interpreter"


def refresh(conns: ssh.Connections, w: ssh.Worker) -> dict | None:
    """Before a launch: bring a venv that `mllm bootstrap` made up to date with the synced
    pyproject (same options as recorded), or make one where there is none. An interpreter given
    with `bootstrap --python` is left alone (None)."""
    record = bootstrap_record(conns, w)
    if not record:
        ssh.emit(w.label, "no Python environment yet: bootstrapping")
        return bootstrap(conns, w, InstallOptions(), None)
    if "python" in record:
        return None
    result = bootstrap(conns, w, InstallOptions(**record["options"]), None)
    if result["state"] == "installed":
        ssh.emit(w.label, f"environment updated in {result['seconds']:.1f}s: {result['reason']}")
    return result


def bootstrap_record(conns: ssh.Connections, w: ssh.Worker) -> dict:
    """How this worker was bootstrapped, to do it again on a recreated VM: {"python": PATH} for
    an interpreter given with --python, {"options": ...} for a venv bootstrap made ({} before any)."""
    code, interpreter = ssh.capture(conns, w, f"cat {PYTHON_RECORD} 2>/dev/null")
    interpreter = interpreter.strip()
    if code or not interpreter:
        return {}
    venv = interpreter.rsplit("/bin/", 1)[0]
    code, text = ssh.capture(conns, w, f"cat {shlex.quote(venv)}/{INSTALL_RECORD} 2>/dev/null")
    try:
        return {"options": asdict(InstallOptions(**json.loads(text)["options"]))} if code == 0 else {"python": interpreter}
    except (ValueError, KeyError, TypeError):
        return {"options": asdict(InstallOptions(venv=venv))}


def _checked(conns: ssh.Connections, w: ssh.Worker, command: str) -> None:
    code, out = ssh.capture(conns, w, command)
    if code:
        raise LauncherError(f"worker {w.index}: `{command}` failed (exit {code}): {out.strip()[-300:]}")
