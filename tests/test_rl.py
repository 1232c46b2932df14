"""The `rl` recipe end to end through the real CLI: a short SFT of the tiny model
(configs/sft/cpu_smoke_for_rl.yaml), then MiniOneRec's RL stage on it (configs/rl/cpu_smoke.yaml)
with the shared Industrial data, real JAX on CPU, one and two processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import INDUSTRIAL_INDEX, SFT_FOR_RL, losses, read_metrics, rl_args, run_hosts, run_trainer, sft_args
from mllm_jax.contracts import RlSummary, RunSummary
from mllm_jax.data import sid

STEPS_PER_EPOCH = 3  # 48 prompts (16 per task), 16 per step
pytestmark = pytest.mark.xdist_group("rl")  # one xdist worker: the SFT fixture runs once


@pytest.fixture(scope="module")
def sft_export(tiny_qwen2, tmp_path_factory) -> Path:
    """The documented first step: SFT of the tiny model on 16 rows per task, exported to hf/."""
    run_dir = tmp_path_factory.mktemp("sft") / "for-rl"
    out = run_trainer(*sft_args(tiny_qwen2, f"output_dir={run_dir}", config=SFT_FOR_RL), cwd=run_dir.parent,
                      recipe="sft")
    assert out.returncode == 0, out.stderr
    return run_dir / "hf"


def run_rl(base: Path, tmp_path: Path, name: str, *sets: str, devices: int = 1):
    out = run_trainer(*rl_args(base, f"output_dir={tmp_path / name}", *sets), cwd=tmp_path, devices=devices,
                      recipe="rl")
    return out, tmp_path / name


def test_smoke_config_learns_on_its_training_prompts(sft_export, tmp_path):
    """GRPO with 16 constrained beams and MiniOneRec's ranking reward: over 10 epochs of the same
    48 prompts the reward and the hit rate (target among the 16 beams) rise; every rollout is a SID."""
    out, run_dir = run_rl(sft_export, tmp_path, "smoke")
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    declared = RunSummary.__annotations__.keys() | RlSummary.__annotations__.keys()
    assert RunSummary.__required_keys__ <= summary.keys() <= declared, summary.keys() ^ declared
    assert summary["status"] == "completed" and summary["final_step"] == summary["updates"] == 30
    assert summary["train_prompts"] == {"sid_next_item": 16, "item_to_sid": 16, "title_history_sid": 16}
    assert summary["effective_batch"] == {"prompts_per_step": 16, "per_device_prompts": 8, "data_parallel_devices": 1,
                                          "micro_batches": 2, "num_generations": 16, "completions_per_step": 256}
    assert summary["token_extension"]["added_tokens"] == 0, "the SFT export already has the SID tokens"
    assert (Path(summary["hf_export_dir"]) / "model.safetensors").is_file()

    steps = [e for e in read_metrics(run_dir) if "rl/hit_rate" in e]
    assert [e["step"] for e in steps] == list(range(1, 31))
    for e in steps:
        assert {"train/loss", "train/grad_norm", "train/lr", "rl/reward_mean", "rl/reward_std", "rl/kl",
                "rl/clip_frac", "perf/rollout_sec", "perf/update_sec"} <= e.keys()
        assert e["rl/valid_frac"] == 1.0, "every constrained rollout is a SID of the index"
    epoch = lambda name: np.asarray([e[name] for e in steps]).reshape(-1, STEPS_PER_EPOCH).mean(axis=1)  # noqa: E731
    hits, rewards = epoch("rl/hit_rate"), epoch("rl/reward_mean")
    assert hits[-1] > hits[0] + 0.05 and rewards[-1] > 1.5 * rewards[0] > 0, (hits, rewards)
    assert steps[0]["rl/kl"] == 0.0 and max(e["rl/kl"] for e in steps) > 0, "the policy leaves the reference"

    # The SFT recipe's SID evaluation at steps 15 and 30, on 16 test prompts with 10 beams.
    evals = [e for e in read_metrics(run_dir) if "eval/hr@10" in e]
    assert [e["step"] for e in evals] == [15, 30] and evals[-1]["eval/invalid_prediction_count"] == 0
    predictions = json.loads((run_dir / "eval_predictions.json").read_text())
    valid = sid.sid_strings(sid.load_index(str(INDUSTRIAL_INDEX)))
    assert len(predictions) == 16 and all(p in valid for row in predictions for p in row["predict"])


def test_two_processes_and_a_resume_match_one_process(sft_export, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed + gloo, as two TPU hosts), stopped after 2 steps
    and resumed from the checkpoint to 4, give the rewards, losses and KL of 1 x 8 in one go."""
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2",
              "jax.mesh_shape=2,2,2", "train.per_device_prompts=2", "data.test_file=''", "export_hf=false"]
    single, single_dir = run_rl(sft_export, tmp_path, "single", *common, devices=8)
    assert single.returncode == 0, single.stderr

    multi_dir = tmp_path / "multi"
    args = rl_args(sft_export, *common, f"output_dir={multi_dir}", f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    first = run_hosts(*[a.replace("train.max_steps=4", "train.max_steps=2") for a in args], cwd=tmp_path, recipe="rl")
    assert [p.returncode for p in first] == [0, 0], [p.stderr for p in first]
    resumed = run_hosts(*args, "--resume", cwd=tmp_path, recipe="rl")
    assert [p.returncode for p in resumed] == [0, 0], [p.stderr for p in resumed]
    assert "resumed from step 2" in resumed[0].stdout
    two = json.loads((multi_dir / "run_summary.json").read_text())
    assert (two["process_count"], two["device_count"], two["final_step"]) == (2, 8, 4)
    for name in ("rl/reward_mean", "rl/hit_rate", "train/loss", "train/grad_norm", "rl/kl"):
        a, b = losses(single_dir, name), losses(multi_dir, name)
        assert a.keys() == b.keys() == {1, 2, 3, 4}, name
        np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=2e-5, atol=1e-9, err_msg=name)


def test_sampling_dapo_several_updates_per_rollout_and_a_moving_reference(sft_export, tmp_path):
    """The other rollout and update paths: constrained sampling at a temperature, DAPO (clip-higher,
    token-level loss, dynamic sampling), two clipped updates per rollout, the reference synced."""
    out, run_dir = run_rl(sft_export, tmp_path, "dapo", "rl.beam_search=false", "rl.temperature=0.8",
                          "rl.algorithm=dapo", "rl.num_iterations=2", "rl.ref_sync_steps=1", "train.max_steps=3",
                          "train.eval_every=0", "data.test_file=''", "export_hf=false", "train.checkpoint_every=0")
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["algorithm"] == "dapo" and summary["updates"] == 6
    steps = [e for e in read_metrics(run_dir) if "rl/hit_rate" in e]
    assert len(steps) == 3 and all(e["rl/valid_frac"] == 1.0 for e in steps)
    assert all(0.0 <= e["rl/kept_groups"] <= 1.0 and np.isfinite(e["train/loss"]) for e in steps)
    assert max(e["rl/clip_frac"] for e in steps) > 0, "the second update of a rollout is clipped somewhere"
