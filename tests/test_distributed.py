"""Two processes x 4 CPU devices (jax.distributed over gloo) train exactly like 1 x 8 devices."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from conftest import SMOKE, free_port, losses, run_trainer, trainer_cmd, trainer_env


def test_two_processes_match_one_process(tmp_path, shakespeare):
    common = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.max_steps=20",
              "--set", "train.log_every=2", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
              "--set", "model.dropout=0.1", "--set", "sample.max_new_tokens=16"]
    single = run_trainer(*common, "--set", f"output_dir={tmp_path / 'single'}", cwd=tmp_path, devices=8)
    common += ["--set", f"train.checkpoint_dir={tmp_path / 'shared-checkpoints'}"]
    assert single.returncode == 0, single.stderr

    multi_dir = tmp_path / "multi"
    port = free_port()
    procs = [
        subprocess.Popen(
            trainer_cmd(*common, "--set", f"output_dir={multi_dir}"), cwd=tmp_path,
            env=trainer_env(4, MLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MLLM_NUM_PROCESSES="2",
                            MLLM_PROCESS_ID=str(pid)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (tmp_path / "shared-checkpoints" / "20").is_dir()

    one, two = (json.loads((d / "run_summary.json").read_text()) for d in (tmp_path / "single", multi_dir))
    assert (one["process_count"], one["local_device_count"], one["device_count"]) == (1, 8, 8)
    assert (two["process_count"], two["local_device_count"], two["device_count"]) == (2, 4, 8)
    assert one["mesh"] == two["mesh"] == {"dp": 8, "fsdp": 1, "tp": 1}
    for name in ("train/loss", "eval/loss", "train/grad_norm"):
        a, b = losses(tmp_path / "single", name), losses(multi_dir, name)
        assert a.keys() == b.keys() and len(a) > 1
        np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5, err_msg=name)
    assert two["sample"] == one["sample"]
    # Only process 0 prints the training log.
    assert "step 20/20" in outputs[0] and "step 20/20" not in outputs[1]


def test_several_processes_need_a_shared_checkpoint_dir(tmp_path, shakespeare):
    port = free_port()
    procs = [
        subprocess.Popen(
            trainer_cmd("--config", str(SMOKE), "--set", f"data.path={shakespeare}"), cwd=tmp_path,
            env=trainer_env(1, MLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MLLM_NUM_PROCESSES="2",
                            MLLM_PROCESS_ID=str(pid)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for _, err in results:
        assert err.strip().splitlines()[-1].startswith(
            "error: train.checkpoint_dir: a run of 2 processes needs a directory every worker shares")
    assert not (tmp_path / "runs").exists()
