"""Checkpoints on a bucket: orbax writes gs:// through tensorstore and gcsfs to a GCS-protocol
server on loopback (tests/harness/gcs.py), from two jax.distributed processes, and a different
set of machines (one process of 8 devices, a fresh run dir, as on a recreated VM) resumes from it
with the run's metrics, which travel in the checkpoint."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import SMOKE, losses, read_metrics, run_hosts, run_trainer, trainer_cmd, trainer_env
from harness.gcs import GcsServer


def steps(gcs: GcsServer, prefix: str) -> list[int]:
    """Complete checkpoints under prefix: orbax marks one on a bucket with <step>/commit_success.txt."""
    return sorted(int(n[len(prefix):].split("/")[0]) for n in gcs.objects(prefix)
                  if n[len(prefix):].count("/") == 1 and n.endswith("/commit_success.txt"))


def test_two_hosts_save_to_a_bucket_and_one_new_host_resumes(tmp_path, shakespeare, gcs):
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in gcs.env.items()))  # the trainer loads ./.env
    ckpt = f"gs://{gcs.bucket}/run-1/checkpoints"
    common = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.log_every=2",
              "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10", "--set", "sample.max_new_tokens=0",
              "--set", f"train.checkpoint_dir={ckpt}"]
    first = tmp_path / "vm-1"
    procs = run_hosts(*common, "--set", "train.max_steps=20", "--set", f"output_dir={first}", cwd=tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [p.stdout[-2000:] + p.stderr[-2000:] for p in procs]
    assert steps(gcs, "run-1/checkpoints/") == [10, 20]
    names = set(gcs.objects("run-1/checkpoints/20/"))
    # Each process wrote its own shards (orbax's OCDBT: one database per process).
    assert {f"run-1/checkpoints/20/default/ocdbt.process_{i}/manifest.ocdbt" for i in (0, 1)} <= names, names
    summary = json.loads((first / "run_summary.json").read_text())
    assert summary["checkpoint_dir"] == ckpt and summary["latest_checkpoint_step"] == 20 and summary["recoveries"] == 0

    # Another machine: one process of 8 devices, no run dir, only the bucket.
    second = tmp_path / "vm-2"
    resumed = run_trainer(*common, "--set", "train.max_steps=30", "--set", f"output_dir={second}", "--resume",
                          cwd=tmp_path, devices=8)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from step 20 ({ckpt})" in resumed.stdout
    before, after = read_metrics(first), read_metrics(second)
    assert after[:len(before)] == before  # the first machine's metrics came back with the checkpoint
    assert sorted(losses(second)) == list(range(2, 31, 2))
    final = json.loads((second / "run_summary.json").read_text())
    assert final["status"] == "completed" and final["final_step"] == 30 and final["process_count"] == 1
    assert [e["step"] for e in final["eval_losses"]] == [10, 20, 30]
    assert steps(gcs, "run-1/checkpoints/") == [20, 30]  # keep_checkpoints 2: step 10 deleted from the bucket


def test_a_kill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, shakespeare, gcs):
    """kill -9 while a checkpoint is being written to the bucket: that checkpoint stays
    incomplete, --resume continues from the one before, and every step's loss equals an
    uninterrupted run's."""
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in gcs.env.items()))
    common = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.log_every=1",
              "--set", "train.max_steps=20", "--set", "train.checkpoint_every=5", "--set", "sample.max_new_tokens=0"]
    reference = tmp_path / "reference"
    done = run_trainer(*common, "--set", f"output_dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    run_dir, prefix = tmp_path / "run", "killed/checkpoints/"
    args = [*common, "--set", f"train.checkpoint_dir=gs://{gcs.bucket}/{prefix}", "--set", f"output_dir={run_dir}"]
    proc = subprocess.Popen(trainer_cmd(*args), cwd=tmp_path, env=trainer_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not steps(gcs, prefix) and time.time() < deadline:
        time.sleep(0.02)
    gcs.write_delay = 0.3  # the next save crawls
    while not gcs.objects(f"{prefix}10/") and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    gcs.write_delay = 0.0
    assert steps(gcs, prefix) == [5] and gcs.objects(f"{prefix}10/"), gcs.objects(prefix)  # 10 is half-written

    resumed = run_trainer(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from step 5" in resumed.stdout
    assert losses(run_dir) == losses(reference) and sorted(losses(run_dir)) == list(range(1, 21))
    assert steps(gcs, prefix) == [15, 20]
