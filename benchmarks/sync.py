"""Code sync to 8 workers: a first (full) sync vs a 1-file incremental one.

    python benchmarks/sync.py [--repeats 5] [--files 300] [--megabytes 4] [--repo PATH]

Runs as root on Linux: starts 8 real sshd hosts on 127.0.0.2.. (tests/harness/sshd.py), builds a
synthetic git repo in a temp dir (`--files` files, about `--megabytes` MB, half text, half
incompressible), or clones `--repo` with `git clone --no-local`, then times `launcher.sync.sync_all`
(wall clock of the whole call) for the first sync, which sends a full bundle, and for syncs after
one commit that changes one file, which send only that. Bytes are the bundle bytes per worker.
Done twice, as benchmarks/fanout.py: with this machine's ~/.bashrc on every worker (pyenv init,
~0.1 s of CPU per SSH command, all 8 workers sharing this machine's cores), and with the plain
~/.bashrc of a fresh VM image.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.sshd import SshCluster, make_client_key  # noqa: E402

from launcher import ssh  # noqa: E402
from launcher.sync import resolve_commit, sync_all  # noqa: E402


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def synthetic_repo(path: Path, files: int, megabytes: float) -> None:
    """`files` files in a few directories; half the bytes compress like source, half do not."""
    rng = random.Random(0)
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    per_file = int(megabytes * 1e6 / files)
    words = [f"token{i}" for i in range(500)]
    for i in range(files):
        f = path / f"pkg{i % 12}" / f"mod{i}.py"
        f.parent.mkdir(exist_ok=True)
        if i % 2:
            f.write_bytes(os.urandom(per_file))
        else:
            f.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(per_file // 70)) + "\n")
    (path / ".gitignore").write_text("/runs/\n")
    git(path, "add", "-A")
    git(path, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "initial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--megabytes", type=float, default=4.0)
    ap.add_argument("--repo", type=Path, help="clone this repo (git clone --no-local) instead of a synthetic one")
    args = ap.parse_args()
    with SshCluster(8) as hosts, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = make_client_key(tmp / "client")
        hosts.authorize(key.public_line)
        workers = [ssh.Worker(i, h.ip, host_keys={h.host_key_type: h.host_key_b64}) for i, h in enumerate(hosts)]
        repo = tmp / "repo"
        if args.repo:
            subprocess.run(["git", "clone", "-q", "--no-local", str(args.repo), str(repo)], check=True)
        else:
            synthetic_repo(repo, args.files, args.megabytes)
        tracked = git(repo, "ls-files", "-z").split("\0")
        size = sum((repo / p).stat().st_size for p in tracked if p and (repo / p).is_file())
        print(f"repo: {'clone of ' + str(args.repo) if args.repo else 'synthetic'}, {len(tracked) - 1} files, "
              f"{size / 1e6:.1f} MB tracked; 8 sshd workers on {os.cpu_count()} shared CPU cores")

        with ssh.Connections("root", key.private_key_path, tmp / "known_hosts") as conns:
            ssh.fan_out(workers, lambda w: ssh.capture(conns, w, "true"))  # connect first: time sync, not auth

            def measure(title: str, remote_dir: str) -> float:
                print(f"{title}:")
                t = time.perf_counter()
                first = sync_all(conns, workers, repo, resolve_commit(repo), remote_dir)
                wall = time.perf_counter() - t
                print(f"  first sync (full={all(r.full for r in first)}): {wall:6.2f} s wall, "
                      f"{first[0].bytes_sent:,} bytes per worker "
                      f"(slowest worker {max(r.seconds for r in first):.2f} s)")
                walls, sent = [], []
                for n in range(args.repeats):
                    edited = repo / tracked[n % (len(tracked) - 1)]
                    with edited.open("a") as f:
                        f.write(f"\n# edit {title} {n}\n")
                    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", f"edit {n}")
                    t = time.perf_counter()
                    results = sync_all(conns, workers, repo, resolve_commit(repo), remote_dir)
                    walls.append(time.perf_counter() - t)
                    assert not any(r.full for r in results)
                    sent.append(max(r.bytes_sent for r in results))
                inc = statistics.median(walls)
                print(f"  incremental, 1 file changed, median of {args.repeats}: {inc:6.2f} s wall, "
                      f"{int(statistics.median(sent)):,} bytes per worker")
                print(f"  full / incremental: {first[0].bytes_sent / statistics.median(sent):,.0f}x bytes, "
                      f"{wall / inc:.1f}x time")
                return inc

            inc = measure("this machine's ~/.bashrc on every worker", "~/mllm-jax")
            ssh.fan_out(workers, lambda w: ssh.capture(conns, w, ": > /root/.bashrc"))
            inc_plain = measure("plain ~/.bashrc, as on a fresh TPU VM", "~/mllm-jax-plain")
            worst = max(inc, inc_plain)
            print(f"goal: incremental <= 2 s: {'met' if worst <= 2 else 'NOT met'} "
                  f"({inc:.2f} s and {inc_plain:.2f} s)")


if __name__ == "__main__":
    main()
