"""The laptop trusts nothing a worker sends back: hostile run files (a FIFO, a link to /dev/zero,
wrong types, NaN, terminal escapes, a trailing byte in an exit file) give one line each, in
bounded time and memory, and leave the local run index usable; through the real `mllm` CLI, on
this machine (`--local`, the same shell scripts a worker runs) and on an sshd worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import launcher_env, mllm
from harness.tpu_slice import ZONE, Slice

RUN = "nanogpt-20260101-000000-abcdef0"
ESC = "\x1b]52;c;cHduZWQ=\x07\x1b]0;pwned\x07\x1b[2J"  # clipboard write, window title, clear screen


def summary(**changes: object) -> str:
    base = {"recipe": "nanogpt", "status": "completed", "final_step": 20, "final_train_loss": 2.5,
            "eval_losses": [{"step": 20, "loss": 2.4}], "best_eval_loss": {"step": 20, "loss": 2.4},
            "git": {"commit": "abcdef0123"}, "process_count": 1, "wandb": {"url": None}, "recoveries": 0}
    return json.dumps({**base, **changes})


def local_run(root: Path, files: dict[str, str]) -> Path:
    run = root / "runs" / RUN
    (run / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run / name).write_text(text)
    return run


def test_hostile_local_run_files_are_one_line_each(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLLM_")}
    run = local_run(tmp_path, {"logs/worker-0.log": f"step 1 {ESC}done\n", "worker-0.exit": "0x\n",
                               "metrics.jsonl": '{"step": "x", "train/loss": 1.0}\n'})
    status = mllm("status", RUN, "--local", cwd=tmp_path, env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "lost" in status.stdout and "step -" in status.stdout  # a trailing byte is no exit code; "x" no step
    logs = mllm("logs", RUN, "--local", cwd=tmp_path, env=env, timeout=60)
    assert "\x1b" not in logs.stdout and "\\x1b]52;c;" in logs.stdout and "\\x07" in logs.stdout
    raw = mllm("logs", RUN, "--local", "--raw", cwd=tmp_path, env=env, timeout=60)
    assert ESC in raw.stdout

    cases = {
        "wandb": (summary(wandb=None, eval_losses="abc"), "eval_losses: expected a list"),
        "nan": (summary(eval_losses=[{"step": 20, "loss": "NaNx"}]), "eval_losses[-1].loss: expected a finite number"),
        "NaN": (summary().replace('"loss": 2.4}]', '"loss": NaN}]'), "eval_losses[-1].loss: expected a finite number"),
        "best": (summary(best_eval_loss=1.5), "best_eval_loss: expected an object"),
        "escape": (summary(status=f"done{ESC}"), "status: expected one line of text"),
    }
    for name, (text, message) in cases.items():
        (run / "run_summary.json").write_text(text)
        out = mllm("fetch-summary", RUN, "--local", cwd=tmp_path, env=env, timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (name, out.stderr)
        assert message in out.stderr and "\x1b" not in out.stderr, (name, out.stderr)
    assert not (tmp_path / ".mllm" / "runs.json").exists()  # nothing bad was indexed

    (run / "run_summary.json").unlink()
    os.mkfifo(run / "run_summary.json")  # a read would never end
    out = mllm("fetch-summary", RUN, "--local", cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr
    (run / "run_summary.json").unlink()
    (run / "run_summary.json").symlink_to("/dev/zero")  # a read would never stop
    out = mllm("fetch-summary", RUN, "--local", cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr

    (run / "run_summary.json").unlink()
    (run / "run_summary.json").write_text(summary())
    assert mllm("fetch-summary", RUN, "--local", cwd=tmp_path, env=env).returncode == 0
    index = tmp_path / ".mllm" / "runs.json"
    data = json.loads(index.read_text())
    data["hand-edited"] = {"run": "hand-edited", "eval_loss": "NaNx"}
    index.write_text(json.dumps(data))
    runs = mllm("runs", "--json", cwd=tmp_path, env=env)
    assert runs.returncode == 0 and [e["run"] for e in json.loads(runs.stdout)] == [RUN], runs.stderr
    assert runs.stderr.count("warning: skipped") == 1 and "hand-edited" in runs.stderr
    assert mllm("runs", cwd=tmp_path, env=env).returncode == 0


@pytest.mark.e2e
def test_hostile_files_on_a_worker_are_bounded(tmp_path, hosts):
    """On an sshd worker: a FIFO summary and metrics, a log link to /dev/zero and escapes."""
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        assert mllm("vm", "create", "hostile", "--zone", ZONE, cwd=tmp_path, env=env).returncode == 0
        make = (f"d=~/mllm-jax/runs/{RUN}; mkdir -p $d/logs && mkfifo $d/run_summary.json $d/metrics.jsonl && "
                f"ln -s /dev/zero $d/logs/worker-0.log && printf '0\\033]0;x\\007' > $d/worker-0.exit && "
                f"ln -sfn {RUN} ~/mllm-jax/runs/latest")
        assert mllm("exec", "--", "sh", "-c", make, cwd=tmp_path, env=env).returncode == 0
        status = mllm("status", "--json", cwd=tmp_path, env=env, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["workers"][0]["state"] == "lost"
        fetched = mllm("fetch-summary", cwd=tmp_path, env=env, timeout=60)
        assert fetched.returncode == 2 and "run_summary.json not a regular file" in fetched.stderr, fetched.stderr
        logs = mllm("logs", cwd=tmp_path, env=env, timeout=60)
        assert logs.returncode == 2 and "no log" in logs.stderr and len(logs.stdout) < 1000, logs.stderr
