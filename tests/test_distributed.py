"""Two processes x 4 CPU devices (jax.distributed over gloo) train exactly like 1 x 8 devices."""

from __future__ import annotations

import json

import numpy as np

from conftest import SMOKE, losses, run_hosts, run_trainer


def test_two_processes_match_one_process(tmp_path, shakespeare):
    """Also the end of a run whose last evaluation is a new best: the last step's checkpoint and
    the best one are saved at once, by both processes (their barriers must not collide)."""
    common = ["--config", str(SMOKE), "--set", f"data.path={shakespeare}", "--set", "train.max_steps=20",
              "--set", "train.log_every=2", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
              "--set", "model.dropout=0.1", "--set", "sample.max_new_tokens=16",
              "--set", "train.load_best_model_at_end=true"]
    single = run_trainer(*common, "--set", f"output_dir={tmp_path / 'single'}", cwd=tmp_path, devices=8)
    common += ["--set", f"train.checkpoint_dir={tmp_path / 'shared-checkpoints'}"]
    assert single.returncode == 0, single.stderr

    multi_dir = tmp_path / "multi"
    procs = run_hosts(*common, "--set", f"output_dir={multi_dir}", cwd=tmp_path)
    outputs = [p.stdout for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    assert (tmp_path / "shared-checkpoints" / "20").is_dir()
    assert (tmp_path / "shared-checkpoints" / "best" / "20").is_dir()  # the last evaluation was the best

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
    procs = run_hosts("--config", str(SMOKE), "--set", f"data.path={shakespeare}", cwd=tmp_path, devices=1,
                      timeout=120)
    assert [p.returncode for p in procs] == [2, 2]
    for p in procs:
        assert p.stderr.strip().splitlines()[-1].startswith(
            "error: train.checkpoint_dir: a run of 2 processes needs a directory every worker shares")
    assert not (tmp_path / "runs").exists()
