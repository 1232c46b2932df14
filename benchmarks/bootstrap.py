"""Bootstrap of 8 workers at once: the first run (a fresh venv each) vs a rerun with nothing changed.

    python benchmarks/bootstrap.py [--workers 8] [--online] [--pip]

Runs as root on Linux: starts real sshd hosts on 127.0.0.2.. (tests/harness/sshd.py), syncs a
clone of this repo to all of them (launcher.sync), then times `launcher.remote.bootstrap` on all
workers in parallel (wall clock of the whole fan-out): uv venv + `uv pip install -e` of the synced
pyproject.toml with the laptop's pins, as `mllm bootstrap` does. Wheels come from uv's cache
(~/.cache/uv, which every host sees through its /root overlay; `--offline`, the default here) or,
with `--online`, from the index. The cache is filled first by one install on this machine.
With `--pip`, the same install the pre-uv way (`python3 -m venv` + pip, from pip's cache and
this machine's pip configuration) is timed side by side, for the installer choice.
All hosts share this machine's cores, so N workers here cost N installs of CPU; on a real slice
each worker has its own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.sshd import SshCluster, make_client_key  # noqa: E402

from launcher import remote, ssh  # noqa: E402
from launcher.sync import resolve_commit, sync_all  # noqa: E402

UV = str(Path(sys.executable).with_name("uv"))


def fill_uv_cache() -> float:
    with tempfile.TemporaryDirectory() as venv:
        t = time.perf_counter()
        subprocess.run([UV, "venv", "-q", "--clear", "--python", sys.executable, venv], check=True)
        subprocess.run([UV, "pip", "install", "-q", "--python", f"{venv}/bin/python", "-e", str(REPO),
                        *remote.laptop_pins(None)], check=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--online", action="store_true", help="install from the index, not --offline from uv's cache")
    ap.add_argument("--pip", action="store_true", help="also time python3 -m venv + pip install, side by side")
    args = ap.parse_args()
    print(f"filling uv's cache on this machine: {fill_uv_cache():.1f} s")
    with SshCluster(args.workers) as hosts, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = make_client_key(tmp / "client")
        hosts.authorize(key.public_line)
        workers = [ssh.Worker(i, h.ip, host_keys={h.host_key_type: h.host_key_b64}) for i, h in enumerate(hosts)]
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
        with ssh.Connections("root", key.private_key_path, tmp / "known_hosts") as conns:
            sync_all(conns, workers, repo, resolve_commit(repo))
            print(f"{len(workers)} sshd workers on {os.cpu_count()} shared CPU cores, repo synced; "
                  f"wheels {'from the index' if args.online else 'from uv cache (--offline)'}")
            options = remote.InstallOptions(offline=not args.online)

            def timed(title: str) -> dict[int, dict]:
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the workers' `+ argv` lines
                    results = ssh.fan_out(workers, lambda w: remote.bootstrap(conns, w, options, None))
                wall = time.perf_counter() - t
                states = sorted({r["state"] for r in results.values()})
                slowest = max(r["seconds"] for r in results.values())
                print(f"  {title}: {wall:6.2f} s wall for {len(workers)} workers, {'/'.join(states)}, "
                      f"slowest worker {slowest:.2f} s (its own measure)")
                return results

            print("uv (what mllm bootstrap runs):")
            timed("first run, fresh venvs")
            timed("second run, nothing changed")
            if args.pip:
                pins = " ".join(shlex.quote(p) for p in remote.laptop_pins(None))
                command = (f"python3 -m venv /root/pip-venv && /root/pip-venv/bin/pip install -q "
                           f"-e ~/mllm-jax {pins}")
                t = time.perf_counter()
                codes = ssh.fan_out(workers, lambda w: ssh.capture(conns, w, command)[0])
                wall = time.perf_counter() - t
                print(f"pip (python3 -m venv + pip install, same pins): {wall:6.2f} s wall for {len(workers)} "
                      f"workers, exit codes {sorted(set(codes.values()))}")


if __name__ == "__main__":
    main()
