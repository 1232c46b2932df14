"""End-to-end runs of the real trainer CLI: summary, resume after a stop, W&B, .env."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
from pathlib import Path


from conftest import MLLM, SMOKE, losses, read_metrics, run_trainer, trainer_cmd, trainer_env
from mllm_jax import preemption
from mllm_jax.contracts import NanoGPTSummary, RunSummary



def test_smoke_run_writes_summary_metrics_and_checkpoints(tmp_path, shakespeare):
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={shakespeare}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = (tmp_path / "runs" / "latest").resolve()
    assert run_dir.name.startswith("nanogpt-") and run_dir.parent == tmp_path / "runs"
    summary = json.loads((run_dir / "run_summary.json").read_text())
    # The summary is exactly the typed contract: every key it always has, nothing undeclared.
    assert RunSummary.__required_keys__ <= summary.keys(), RunSummary.__required_keys__ - summary.keys()
    declared = RunSummary.__annotations__.keys() | NanoGPTSummary.__annotations__.keys()
    assert summary.keys() <= declared, summary.keys() - declared
    assert {"final_step", "final_train_loss", "tokens_per_sec", "step_time_sec", "mfu"} <= summary.keys()
    assert summary["status"] == "completed" and summary["final_step"] == 40
    assert set(summary["versions"]) >= {"python", "jax", "jaxlib", "flax", "optax", "wandb"}
    assert all(summary["versions"][k] for k in ("python", "jax", "jaxlib", "flax", "optax", "wandb"))
    assert summary["backend"] == "cpu" and summary["process_count"] == 1
    assert summary["mesh"] == {"dp": 1, "fsdp": 1, "tp": 1}
    memory = summary["step_memory"]  # the compiled step's memory_analysis(), as preflight reports it
    assert memory["peak"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] > 0
    assert memory["alias"] > 0, "the state is donated: its buffers are reused for the new state"
    assert [e["step"] for e in summary["eval_losses"]] == [20, 40]
    assert summary["best_eval_loss"]["loss"] == min(e["loss"] for e in summary["eval_losses"])
    assert summary["eval_losses"][-1]["loss"] < 4.17, "below the uniform-guess loss ln(65)"
    assert summary["tokens_per_sec"] > 0 and 0 < summary["mfu"] < 1
    assert summary["latest_checkpoint_step"] == 40 and (run_dir / "checkpoints" / "40").is_dir()
    assert summary["wandb"] == {"mode": "disabled"} and summary["config_path"] == str(SMOKE)
    assert len(summary["sample"]) == 64
    # metrics.jsonl: one event per log step, with the documented names.
    train_events = [e for e in read_metrics(run_dir) if "train/loss" in e]
    assert [e["step"] for e in train_events] == [10, 20, 30, 40]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_sec",
            "perf/mfu"} <= train_events[-1].keys()
    # The latest complete checkpoint at each log line (the recovery supervisor reads it): none
    # before step 20's save, then step 20's once its asynchronous save has completed.
    assert [e.get("checkpoint/step") for e in train_events][:2] == [None, None]
    assert {e.get("checkpoint/step") for e in train_events[2:]} <= {None, 20}
    assert (run_dir / "config_resolved.yaml").read_text().count("max_steps: 40") == 1
    # The console: one line per log step, and the eval results.
    assert "step 40/40 | loss" in out.stdout and "eval step 40: eval/loss" in out.stdout


def test_stop_then_resume_matches_uninterrupted_run(tmp_path, shakespeare):
    common = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.max_steps=30",
              "--set", "train.log_every=1", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
              "--set", "model.dropout=0.1", "--set", "sample.max_new_tokens=0"]
    full = run_trainer(*common, "--set", f"output_dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    # Interrupt a second run with SIGTERM (as `mllm stop` and spot preemption do) mid-way.
    part_dir = tmp_path / "part"
    proc = subprocess.Popen(trainer_cmd(*common, "--set", f"output_dir={part_dir}"), cwd=tmp_path,
                            env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (part_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and max(losses(part_dir), default=0) < 12:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    stopped = json.loads((part_dir / "run_summary.json").read_text())
    assert stopped["status"] == "stopped" and 12 <= stopped["final_step"] < 30
    assert stopped["latest_checkpoint_step"] == stopped["final_step"]

    resumed = run_trainer(*common, "--set", f"output_dir={part_dir}", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped['final_step']}" in resumed.stdout
    assert losses(part_dir) == losses(tmp_path / "full"), "resumed losses must equal the uninterrupted run's"
    assert losses(part_dir, "eval/loss") == losses(tmp_path / "full", "eval/loss")
    summary = json.loads((part_dir / "run_summary.json").read_text())
    assert summary["status"] == "completed" and [e["step"] for e in summary["eval_losses"]] == [10, 20, 30]


def test_resume_compares_the_checkpoints_settings(tmp_path, shakespeare):
    """A resume trains on only where the checkpoint's recorded settings allow it: a completed run
    needs more steps, a change of the model or numerics must be named (--allow-config-change),
    and then config_resolved.yaml describes the run that goes on."""
    args = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "output_dir=run",
            "--set", "train.max_steps=20", "--set", "sample.max_new_tokens=0"]
    assert run_trainer(*args, cwd=tmp_path).returncode == 0
    done = run_trainer(*args, "--resume", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == ("error: --resume: the checkpoint is at step 20 and the run trains "
                                                    "20 steps: nothing to train; raise train.max_steps to go on\n")
    more = [*args, "--set", "train.max_steps=30", "--set", "model.dropout=0.1", "--set", "train.log_every=5"]
    changed = run_trainer(*more, "--resume", cwd=tmp_path)
    assert changed.returncode == 2 and changed.stderr == (
        "error: --resume: checkpoint 20 was trained with other settings: model.dropout: 0.0 -> 0.1; they change the "
        "model, the data or the numerics: pass --allow-config-change KEY for each change meant\n")
    assert "dropout: 0.0" in (tmp_path / "run" / "config_resolved.yaml").read_text()  # untouched
    allowed = run_trainer(*more, "--resume", "--allow-config-change", "model.dropout", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed from step 20" in allowed.stdout and "step 30/30" in allowed.stdout
    resolved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "dropout: 0.1" in resolved and "max_steps: 30" in resolved
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["final_step"] == 30


def test_resume_without_checkpoint_is_an_error(tmp_path, shakespeare):
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--resume", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --resume: no runs/nanogpt-*/checkpoints found; pass --set output_dir=RUN_DIR"


def test_wandb_offline_run_and_env_file(tmp_path, shakespeare):
    secret = "wandb-secret-value-0123456789"
    (tmp_path / ".env").write_text(f"export WANDB_API_KEY='{secret}'\r\nMLLM_TEST_FLAG=on\r\n")
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "wandb.mode=offline",
                      "--set", "wandb.project=mllm-tests", "--set", "train.max_steps=20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "loaded 2 variable(s) from .env: WANDB_API_KEY, MLLM_TEST_FLAG" in out.stdout
    run_dir = (tmp_path / "runs" / "latest").resolve()
    summary_text = (run_dir / "run_summary.json").read_text()
    summary = json.loads(summary_text)
    wandb_dir = Path(summary["wandb"]["dir"])
    assert summary["wandb"]["mode"] == "offline" and wandb_dir.is_dir() and wandb_dir.is_relative_to(run_dir)
    assert summary["wandb"]["sync_command"] == f"wandb sync {wandb_dir}"
    assert list(wandb_dir.glob("*.wandb")), "the offline run holds its W&B log"
    for text in (out.stdout, out.stderr, summary_text, (run_dir / "config_resolved.yaml").read_text()):
        assert secret not in text


def test_wandb_online_without_credentials_fails_before_compute(tmp_path, shakespeare):
    env = trainer_env(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "wandb.mode=online",
                      cwd=tmp_path, env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("error: wandb.mode is online but no W&B credentials were found")
    assert not (tmp_path / "runs").exists()


def test_terminal_gets_a_progress_bar_and_bf16_trains(tmp_path, shakespeare):
    """On a terminal (a real pty) rich draws a progress bar; bf16 compute trains to a finite loss."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        trainer_cmd("--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.max_steps=20",
                    "--set", "jax.compute_dtype=bfloat16", "--set", "sample.max_new_tokens=0"),
        cwd=tmp_path, env=trainer_env(TERM="xterm", COLUMNS="100"), stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "━" in screen and "20/20" in screen, screen[-2000:]
    assert "step 20/20 | loss" in screen
    summary = json.loads(((tmp_path / "runs" / "latest") / "run_summary.json").read_text())
    assert summary["status"] == "completed" and 0 < summary["final_train_loss"] < 4.2


def test_bad_data_is_refused_before_the_run_dir_exists(tmp_path):
    """Bad input leaves nothing behind; a run that fails later still writes its summary
    (test_hardening's full disk)."""
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n")  # far shorter than a block
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={short}", "--set", "output_dir=failed",
                      cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"error: data.path: the val split of {short} (last 10%) has 5 characters, "
                                  "fewer than model.block_size + 1 = 33")
    assert not (tmp_path / "failed").exists() and not (tmp_path / "runs").exists()


def test_mllm_train_is_the_trainers_own_command_line(tmp_path):
    """`mllm train` hands its arguments to `python -m mllm_jax train`'s one parser."""
    run = lambda *a: subprocess.run([MLLM, "train", *a], cwd=tmp_path, env=trainer_env(),  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    printed = run("nanogpt", "--config", str(SMOKE), "--set", "train.max_steps=7", "--print-config")
    assert printed.returncode == 0 and "max_steps: 7" in printed.stdout, printed.stderr
    helped = run("--help")
    assert helped.returncode == 0 and "--run-mode" in helped.stdout and "--print-config" in helped.stdout
    bad = run("nope")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown recipe 'nope'; expected one of nanogpt, sft, rl"
    missing = run()
    assert missing.returncode == 2 and "the following arguments are required: recipe" in missing.stderr


def test_preemption_notice_from_the_metadata_server_checkpoints_and_stops(tmp_path, shakespeare):
    """A spot VM's metadata server says TRUE on instance/preempted (a long poll): the trainer
    saves a checkpoint and stops as on SIGTERM, and says why."""
    notice = threading.Event()
    polls: list[str] = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            polls.append(self.path)
            assert self.headers["Metadata-Flavor"] == "Google" and self.path.startswith(preemption.PREEMPTED)
            if "last_etag" in self.path:  # wait_for_change: answer when the value changes
                notice.wait(120)
            body = b"TRUE" if notice.is_set() else b"FALSE"
            self.send_response(200)
            self.send_header("ETag", "2" if notice.is_set() else "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run_dir = tmp_path / "run"
    env = trainer_env(**{preemption.HOST_ENV: f"127.0.0.1:{server.server_address[1]}"})
    proc = subprocess.Popen(trainer_cmd("--config", str(SMOKE), "--set", f"data.path={shakespeare}",
                                        "--set", "train.max_steps=100000", "--set", "train.log_every=1",
                                        "--set", f"output_dir={run_dir}"),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 5):
            time.sleep(0.05)
        notice.set()
        output = proc.communicate(timeout=120)[0]
    finally:
        server.shutdown()
    assert proc.returncode == 128 + signal.SIGTERM, output
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["latest_checkpoint_step"] == summary["final_step"] >= 5
    assert (f"stop requested (the metadata server's preemption notice): checkpoint saved at step "
            f"{summary['final_step']}") in output
    assert polls[0] == f"{preemption.PREEMPTED}?wait_for_change=true" and "last_etag=1" in polls[1]
