"""Runs ON a worker (sent by `mllm bootstrap` as `python3 -c SOURCE PLAN_JSON`): make the
venv that runs `python -m mllm_jax` hold exactly what the synced repo's pyproject.toml asks for.

Standard library only: a bare TPU VM image has `python3` but often no pip, venv or ensurepip.
uv creates the venv and installs, so none of those are needed; uv itself comes from the worker
(`~/.mllm/bin/uv` or PATH) at the laptop's version, else from the wheel in `--find-links` or on
the package index (PyPI by default), sha256-checked where the index gives the hash.

What was installed is recorded in `<venv>/mllm-install.json` (the plan's `record`): a hash of pyproject.toml plus the
install spec (python, pins, target), and the options used. Same hash and every pin installed as
pinned = nothing to do (the answer is `up-to-date`, in well under a second). The last stdout line is
`MLLM_BOOTSTRAP {json}`; before it, each command run (`+ argv`) and anything uv has to say
(it runs `--quiet`: errors and warnings only).
"""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile

UV_HOME = os.path.expanduser("~/.mllm/bin")


def main(plan: dict) -> dict:
    started = time.monotonic()
    repo, venv = os.path.expanduser(plan["repo"]), os.path.expanduser(plan["venv"])
    python = os.path.join(venv, "bin", "python")
    try:
        with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
            pyproject = f.read()
    except FileNotFoundError:
        return {"state": "error", "error": f"{repo}/pyproject.toml not found: sync the repo first (`mllm sync`)"}
    tpu = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    # What is installed (not where it comes from: --offline, --find-links, the index, uv's version).
    spec = {"target": repo + ("[tpu]" if tpu else ""), "python_version": plan["python_version"], "pins": plan["pins"]}
    pyproject_sha = hashlib.sha256(pyproject).hexdigest()
    digest = hashlib.sha256((pyproject_sha + json.dumps(spec, sort_keys=True)).encode()).hexdigest()
    record_path = os.path.join(venv, plan["record"])  # mllm_jax.contracts.INSTALL_RECORD
    record = _read_json(record_path)
    drift = _drift(python, plan["pins"]) if record.get("hash") == digest and os.access(python, os.X_OK) else None
    if drift == []:
        return {"state": "up-to-date", "python": python, "tpu": tpu, "seconds": time.monotonic() - started}
    reason = ("no venv yet" if not os.access(python, os.X_OK) else "not installed by mllm bootstrap" if not record
              else "pyproject.toml changed" if record.get("pyproject_sha256") != pyproject_sha
              else "the pins or the Python changed" if drift is None
              else "installed versions differ from the pins: " + ", ".join(drift))
    uv = find_uv(plan["uv_version"], plan["find_links"], plan["index_url"], plan["offline"])
    if not os.access(python, os.X_OK) or not _same_python(python, plan["python_version"]):
        _run([uv, "venv", "--quiet", "--clear", "--python", plan["python_version"], venv])
    flags = (["--offline"] if plan["offline"] else []) + sum((["--find-links", d] for d in plan["find_links"]), [])
    if plan["index_url"]:
        flags += ["--index-url", plan["index_url"]]
    # uv trusts what a venv says it holds: a drifted package must be reinstalled by name.
    flags += sum((["--reinstall-package", d.split()[0]] for d in drift or []), [])
    _run([uv, "pip", "install", "--quiet", "--python", python, *flags, "-e", spec["target"], *plan["pins"]])
    # Every requirement present and consistent (no hand-kept list), then every recipe imports,
    # from the repo as a run starts there.
    _run([uv, "pip", "check", "--quiet", "--python", python])
    _run([python, "-c", "import importlib, mllm_jax.train; from mllm_jax.recipes import RECIPES; "
                        "[importlib.import_module(m) for m in RECIPES.values()]"], cwd=repo)
    record = {"hash": digest, "pyproject_sha256": pyproject_sha, "spec": spec, "options": plan["options"],
              "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(record_path + ".tmp", record_path)
    return {"state": "installed", "reason": reason, "python": python, "tpu": tpu, "uv": uv,
            "seconds": time.monotonic() - started}


def find_uv(version: str, find_links: list[str], index_url: str | None, offline: bool) -> str:
    """A uv binary of exactly `version`: ours, then PATH's, then fetched from a wheel."""
    ours = os.path.join(UV_HOME, "uv")
    for candidate in (ours, shutil.which("uv")):
        if candidate and _uv_version(candidate) == version:
            return candidate
    data = None
    for d in find_links:
        names = sorted(n for n in os.listdir(d) if _uv_wheel_name_ok(n, version)) if os.path.isdir(d) else []
        if names:
            with open(os.path.join(d, names[-1]), "rb") as f:
                data = f.read()
            break
    if data is None and offline:
        raise SystemExit(f"no uv {version} on this worker and no uv-{version} wheel in --find-links (--offline)")
    if data is None:
        try:
            data = _download_uv(version, index_url or "https://pypi.org/simple")
        except OSError as e:  # URLError, timeouts: say what could not be fetched
            raise SystemExit(f"cannot fetch uv {version} from {index_url or 'PyPI'}: {e}") from None
    os.makedirs(UV_HOME, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        member = next((n for n in z.namelist() if n.endswith(".data/scripts/uv")), None)
        if member is None:
            raise SystemExit(f"the uv {version} wheel holds no uv binary")
        fd, tmp = tempfile.mkstemp(dir=UV_HOME)
        with os.fdopen(fd, "wb") as f:
            f.write(z.read(member))
    os.chmod(tmp, 0o755)
    os.replace(tmp, ours)
    if _uv_version(ours) != version:
        raise SystemExit(f"{ours} does not report uv {version}")
    return ours


def _uv_wheel_name_ok(name: str, version: str) -> bool:
    """uv's wheel for this machine: uv-VERSION-py3-none-<platform tags>.whl (manylinux/musllinux)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return (name.startswith(f"uv-{version}-py3-none-") and name.endswith(".whl")
            and "linux" in name and machine in name)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _download_uv(version: str, index_url: str) -> bytes:
    """uv's wheel from a PEP 503 simple index; checked against the `#sha256=` the index gives."""
    page_url = index_url.rstrip("/") + "/uv/"
    with urllib.request.urlopen(page_url, timeout=60) as resp:
        links = _Links()
        links.feed(resp.read().decode("utf-8", "replace"))
    for href in links.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        path, _, fragment = url.partition("#")
        if _uv_wheel_name_ok(urllib.parse.unquote(path.rsplit("/", 1)[-1]), version):
            with urllib.request.urlopen(path, timeout=300) as resp:
                data = resp.read()
            if fragment.startswith("sha256=") and hashlib.sha256(data).hexdigest() != fragment[7:]:
                raise SystemExit(f"uv {version} from {path}: sha256 does not match the index")
            return data
    raise SystemExit(f"no uv {version} wheel for {platform.machine()} Linux at {page_url}")


def _uv_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.split()
    return parts[1] if out.returncode == 0 and len(parts) >= 2 else None


def _same_python(python: str, wanted: str) -> bool:
    out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True)
    have = out.stdout.strip()
    return out.returncode == 0 and (have == wanted or have.startswith(wanted + "."))


def _drift(python: str, pins: list[str]) -> list[str]:
    """Pinned packages whose installed version is not the pin (someone pip-installed over it)."""
    wanted = dict(pin.split("==", 1) for pin in pins)
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", code, *wanted], capture_output=True, text=True)
    have = json.loads(out.stdout) if out.returncode == 0 else {}
    return [f"{n} {have.get(n)} (pinned {want})" for n, want in wanted.items() if have.get(n) != want]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _run(argv: list[str], cwd: str | None = None) -> None:
    print("+ " + " ".join(argv), flush=True)
    # uv trusts the system's certificate store, as pip does (a TLS-inspecting proxy's CA is there).
    code = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, env={**os.environ, "UV_NATIVE_TLS": "1"}).returncode
    if code:
        raise SystemExit(f"`{' '.join(argv[:3])} ...` failed (exit {code})")


if __name__ == "__main__":
    try:
        result = main(json.loads(sys.argv[1]))
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        result = {"state": "error", "error": e.code}
    print("MLLM_BOOTSTRAP " + json.dumps(result), flush=True)
    sys.exit(1 if result["state"] == "error" else 0)
