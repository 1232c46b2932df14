"""`mllm exec` fan-out: 1 vs 8 workers, and per-command latency on a reused connection.

    python benchmarks/fanout.py [--repeats 5]

Runs as root on Linux: starts 8 real sshd hosts on 127.0.0.2.. (tests/harness/sshd.py) behind a
local Cloud TPU API (tests/harness/tpu_api.py), creates a 8-worker VM with `mllm vm create`,
then times the real `mllm exec -- true` CLI on one worker and on all eight, alternating, and
the launcher's own SSH layer for a first (connecting) and later (reusing) command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness.sshd import SshCluster  # noqa: E402
from harness.tpu_api import FakeTpuApi  # noqa: E402

MLLM = str(Path(sys.executable).with_name("mllm"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with SshCluster(8) as hosts, tempfile.TemporaryDirectory() as tmp:

        def authorize(node: dict) -> None:
            hosts.authorize(node["metadata"]["ssh-keys"].split(":", 1)[1])

        nodes = lambda name, t: [{"ip": h.ip, "host_keys": {h.host_key_type: h.host_public_key_line}} for h in hosts]  # noqa: E731
        with FakeTpuApi(nodes, on_create=authorize, op_delay=0.1) as api:
            env = {**os.environ, "MLLM_TPU_API_ENDPOINT": api.endpoint, "MLLM_PROJECT": "bench-project",
                   "XDG_CONFIG_HOME": f"{tmp}/config"}
            run = lambda *a: subprocess.run([MLLM, *a], cwd=tmp, env=env, capture_output=True, text=True, check=True)  # noqa: E731
            run("vm", "create", "bench", "--zone", "us-east1-d", "--type", "v6e-64")
            run("exec", "--", "true")  # first contact: keys, caches

            def measure(title: str) -> None:
                times: dict[str, list[float]] = {"1 worker": [], "8 workers": []}
                for _ in range(args.repeats):
                    for label, worker in (("1 worker", "0"), ("8 workers", "all")):
                        t = time.perf_counter()
                        run("exec", "--worker", worker, "--", "true")
                        times[label].append(time.perf_counter() - t)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"mllm exec -- true, whole CLI, median of {args.repeats} ({title}):")
                for k, v in med.items():
                    print(f"  {k:10s} {v * 1000:7.0f} ms")
                print(f"  8 workers / 1 worker: {med['8 workers'] / med['1 worker']:.2f}x (goal <= 1.3x)")

            # All 8 "workers" share this machine's cores, and every SSH command runs the remote
            # user's ~/.bashrc (here: pyenv init, ~0.1 s of CPU). Measured as is, then with the
            # plain ~/.bashrc of a fresh VM image (each host's /root is private to it).
            measure("this machine's ~/.bashrc on every worker")
            run("exec", "--", "sh", "-c", ": > /root/.bashrc")
            measure("plain ~/.bashrc, as on a fresh TPU VM")

            os.environ.update(env)
            from launcher import cloud, keys, ssh

            z = cloud.Zone("bench-project", "us-east1-d", cloud.make_client())
            host_keys = z.host_keys("bench")
            w = ssh.Worker(0, hosts[0].ip, host_keys=host_keys[0])
            key_file, _ = keys.ensure_key()
            with ssh.Connections("root", key_file, keys.config_dir() / "known_hosts") as conns:
                t = time.perf_counter()
                ssh.capture(conns, w, "true")
                first = time.perf_counter() - t
                later = []
                for _ in range(20):
                    t = time.perf_counter()
                    ssh.capture(conns, w, "true")
                    later.append(time.perf_counter() - t)
            print("one worker, launcher SSH layer:")
            print(f"  first command (connect + auth + exec): {first * 1000:6.0f} ms")
            print(f"  later commands, reused connection:     {statistics.median(later) * 1000:6.0f} ms (median of 20)")
            print(f"  reuse saves {first / statistics.median(later):.1f}x per command")


if __name__ == "__main__":
    main()
