"""The `sft` recipe end to end through the real CLI: a tiny random Qwen2 written by
`python -m mllm_jax tiny-model`, the shared MiniOneRec Industrial data, real JAX on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import INDUSTRIAL_VALID, losses, read_metrics, run_hosts, run_trainer, sft_args, trainer_env
from mllm_jax.contracts import RunSummary, SftSummary


def run_sft(model_dir: Path, tmp_path: Path, name: str, *sets: str, devices: int = 1):
    out = run_trainer(*sft_args(model_dir, f"output_dir={tmp_path / name}", *sets), cwd=tmp_path, devices=devices,
                      recipe="sft")
    return out, tmp_path / name


def test_smoke_config_trains_on_real_data_and_exports(tiny_qwen2, tmp_path):
    out, run_dir = run_sft(tiny_qwen2, tmp_path, "smoke")
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 60
    declared = RunSummary.__annotations__.keys() | SftSummary.__annotations__.keys()
    assert RunSummary.__required_keys__ <= summary.keys() <= declared, summary.keys() ^ declared
    train = losses(run_dir)
    assert train[60] < train[10] - 0.5, f"the loss must fall on real data: {train}"
    evals = [e["loss"] for e in summary["eval_losses"]]
    assert [e["step"] for e in summary["eval_losses"]] == [30, 60] and evals[1] < evals[0] - 0.3
    ext = summary["token_extension"]
    assert ext["added_tokens"] == ext["sid_tokens"] > 0
    assert ext["vocab_size"] == ext["tokenizer_size_before"] + ext["added_tokens"]
    assert ext["padded_vocab_size"] % 128 == 0 and ext["padded_vocab_size"] >= ext["vocab_size"]
    batch = summary["effective_batch"]
    assert batch == {"global_batch_size": 16, "per_device_train_batch_size": 8, "data_parallel_devices": 1,
                     "gradient_accumulation_steps": 2}
    stats = summary["step_time_stats"]
    assert stats["timed_steps"] == 59 and stats["min"] <= stats["median"] <= stats["max"]
    assert summary["train_examples"] == 5 * 128  # MiniOneRec's five tasks, 128 rows (alignment: pairs) each
    events = [e for e in read_metrics(run_dir) if "train/loss" in e]
    assert {"train/loss", "train/lr", "perf/step_time_sec", "perf/tokens_per_sec", "perf/mfu"} <= events[-1].keys()
    assert (Path(summary["hf_export_dir"]) / "model.safetensors").is_file()
    # The SID evaluation (run_mode train_eval): 16 test prompts, 10 beams, at steps 30 and 60.
    metrics = summary["eval_metrics"]
    assert set(metrics) == {"eval/loss", "eval/hr@1", "eval/hr@5", "eval/hr@10", "eval/ndcg@1", "eval/ndcg@5",
                            "eval/ndcg@10", "eval/invalid_prediction_count"}
    assert metrics["eval/invalid_prediction_count"] == 0, "constrained beams are always valid SIDs"
    assert 0 <= metrics["eval/hr@1"] <= metrics["eval/hr@5"] <= metrics["eval/hr@10"] <= 1
    predictions = json.loads((run_dir / "eval_predictions.json").read_text())
    assert len(predictions) == 16 and all(len(p["predict"]) == 10 for p in predictions)
    assert json.loads((run_dir / "eval_metrics.json").read_text())["step"] == 60
    assert [e["step"] for e in read_metrics(run_dir) if "eval/hr@1" in e] == [30, 60]


def test_eval_mode_on_a_checkpoint_reproduces_the_final_metrics(tiny_qwen2, tmp_path):
    common = ["train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=0", "data.sample_test=8",
              "eval.num_beams=5", "eval.topk=[1,5]"]
    out, run_dir = run_sft(tiny_qwen2, tmp_path, "trained", *common)
    assert out.returncode == 0, out.stderr
    trained = json.loads((run_dir / "run_summary.json").read_text())
    ev_dir = tmp_path / "evaluated"
    checkpoint = f"eval.checkpoint={run_dir / 'checkpoints'}"
    ev = run_trainer(*sft_args(tiny_qwen2, *common, f"output_dir={ev_dir}", checkpoint), "--run-mode", "eval",
                     cwd=tmp_path, recipe="sft")
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads((ev_dir / "run_summary.json").read_text())
    assert evaluated["final_step"] == 4 and evaluated["train_examples"] == 0 and "hf_export_dir" not in evaluated
    assert evaluated["eval_metrics"] == trained["eval_metrics"]
    assert (json.loads((ev_dir / "eval_predictions.json").read_text())
            == json.loads((run_dir / "eval_predictions.json").read_text()))
    # The exported HF weights (bfloat16) evaluate too, with no training data at all.
    hf, hf_dir = run_sft(tiny_qwen2, tmp_path, "hf", *common, "run_mode=eval", f"base_model={run_dir / 'hf'}",
                         "data.train_file=/nonexistent.csv")
    assert hf.returncode == 0, hf.stderr
    assert json.loads((hf_dir / "run_summary.json").read_text())["eval_metrics"]["eval/invalid_prediction_count"] == 0


def test_bf16_lion_cosine_schedule_epochs_and_remat(tiny_qwen2, tmp_path):
    """The other optimizer/schedule/dtype settings train too; epochs set the number of steps."""
    out, run_dir = run_sft(tiny_qwen2, tmp_path, "bf16", "run_mode=train", "train.max_steps=null",
                           "train.num_train_epochs=0.25", "train.optimizer=lion", "train.learning_rate=1e-3",
                           "train.lr_schedule=cosine", "train.warmup_steps=1", "train.gradient_checkpointing=true",
                           "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "export_hf=false",
                           "jax.param_dtype=bfloat16", "jax.compute_dtype=bfloat16")
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    # 640 examples (128 per task x MiniOneRec's 5 tasks) in batches of 16: 40 steps an epoch, a quarter of it is 10.
    assert summary["steps_per_epoch"] == 40 and summary["max_steps"] == summary["final_step"] == 10
    train = losses(run_dir)
    assert all(np.isfinite(list(train.values()))) and train[10] < train[1]
    lrs = [e["train/lr"] for e in read_metrics(run_dir) if "train/lr" in e]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 8 / 9)))  # cosine, 8 of 9 decay steps done


def test_gradient_accumulation_and_the_chunked_loss_give_the_same_update(tiny_qwen2, tmp_path):
    common = ["run_mode=train", "train.global_batch_size=32", "train.max_steps=3", "train.log_every=1",
              "train.eval_every=0", "train.checkpoint_every=0", "export_hf=false", "data.eval_file=''",
              "train.load_best_model_at_end=false", "train.early_stopping_patience=0", "train.warmup_steps=0"]
    one, one_dir = run_sft(tiny_qwen2, tmp_path, "1x32", *common, "train.per_device_train_batch_size=32")
    four, four_dir = run_sft(tiny_qwen2, tmp_path, "4x8", *common, "train.per_device_train_batch_size=8")
    chunked, chunked_dir = run_sft(tiny_qwen2, tmp_path, "4x8-chunked", *common,
                                   "train.per_device_train_batch_size=8", "train.loss_chunk_size=7")
    assert one.returncode == 0 and four.returncode == 0 and chunked.returncode == 0, \
        one.stderr + four.stderr + chunked.stderr
    assert json.loads((four_dir / "run_summary.json").read_text())["effective_batch"][
        "gradient_accumulation_steps"] == 4
    for name in ("train/loss", "train/grad_norm"):
        a, b, c = losses(one_dir, name), losses(four_dir, name), losses(chunked_dir, name)
        assert a.keys() == b.keys() == c.keys() == {1, 2, 3}
        np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose([c[s] for s in a], [b[s] for s in a], rtol=2e-5, err_msg=name)


def test_meshes_give_the_same_loss(tiny_qwen2, tmp_path):
    common = ["run_mode=train", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "export_hf=false", "data.eval_file=''", "train.load_best_model_at_end=false",
              "train.early_stopping_patience=0", "train.per_device_train_batch_size=2"]
    results = {}
    for mesh in ("8,1,1", "1,8,1", "2,2,2"):
        out, run_dir = run_sft(tiny_qwen2, tmp_path, mesh.replace(",", "-"), *common, f"jax.mesh_shape={mesh}",
                               devices=8)
        assert out.returncode == 0, out.stderr
        results[mesh] = losses(run_dir)
    assert results["8,1,1"].keys() == {1, 2, 3}
    for mesh in ("1,8,1", "2,2,2"):
        np.testing.assert_allclose(list(results[mesh].values()), list(results["8,1,1"].values()), rtol=2e-5,
                                   err_msg=mesh)


def _bad_csv(path: Path, drop: str | None = None, replace: tuple[str, str] | None = None) -> Path:
    """The first rows of the shared CSV, without column `drop` or with text replaced."""
    lines = INDUSTRIAL_VALID.read_text().splitlines()[:20]
    text = "\n".join(lines) + "\n"
    if replace:
        text = text.replace(*replace)
    if drop:
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(text)))
        out = io.StringIO()
        writer = csv.DictWriter(out, [c for c in rows[0] if c != drop])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != drop})
        text = out.getvalue()
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "unknown_sid", "max_len", "mesh", "batch"])
def test_bad_input_is_one_clear_line(tiny_qwen2, tmp_path, case):
    first_sid = INDUSTRIAL_VALID.read_text().splitlines()[1].split("'<a_")[1].split(">")[0]
    sets, devices = {
        "missing_file": (["data.train_file=/nonexistent/train.csv"], 1),
        "missing_column": ([f"data.train_file={_bad_csv(tmp_path / 'no_column.csv', drop='history_item_sid')}"], 1),
        "unknown_sid": ([f"data.train_file="
                         f"{_bad_csv(tmp_path / 'unknown_sid.csv', replace=(f'<a_{first_sid}>', '<a_99999>'))}"], 1),
        "max_len": (["data.max_len=12"], 1),
        "mesh": (["jax.mesh_shape=3,1,1"], 2),
        "batch": (["train.global_batch_size=24", "train.per_device_train_batch_size=4"], 4),
    }[case]
    expected = {
        "missing_file": "data.train_file: file not found: /nonexistent/train.csv",
        "missing_column": "has no column 'history_item_sid'",
        "unknown_sid": "'<a_99999>",
        "max_len": "data.max_len",
        "mesh": "jax.mesh_shape '3,1,1' needs 3 devices, found 2",
        "batch": "train.global_batch_size=24 is not divisible by per_device_train_batch_size x data-parallel "
                 "devices = 4 x 4",
    }[case]
    out = run_trainer(*sft_args(tiny_qwen2, *sets), cwd=tmp_path, devices=devices, recipe="sft",
                      env=trainer_env(devices))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists(), "nothing may be created for bad input"


def test_two_processes_match_one_process(tiny_qwen2, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed + gloo, as two TPU hosts) on a (2,2,2) mesh
    train, evaluate (loss and beam search: each process feeds its share of the test prompts)
    and export exactly like 1 x 8."""
    common = ["train.max_steps=3", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=0",
              "train.per_device_train_batch_size=2", "jax.mesh_shape=2,2,2", "data.sample_eval=24",
              "data.sample_test=12", "eval.num_beams=5", "eval.topk=[1,5]", "eval.per_device_batch_size=1"]
    single, single_dir = run_sft(tiny_qwen2, tmp_path, "single", *common, devices=8)
    assert single.returncode == 0, single.stderr

    multi_dir = tmp_path / "multi"
    args = sft_args(tiny_qwen2, *common, f"output_dir={multi_dir}", f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    procs = run_hosts(*args, cwd=tmp_path, recipe="sft")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    two = json.loads((multi_dir / "run_summary.json").read_text())
    assert (two["process_count"], two["device_count"]) == (2, 8)
    assert two["eval_metrics"] == json.loads((single_dir / "run_summary.json").read_text())["eval_metrics"]
    assert (json.loads((multi_dir / "eval_predictions.json").read_text())
            == json.loads((single_dir / "eval_predictions.json").read_text()))
    for name in ("train/loss", "train/grad_norm", "eval/loss", "eval/hr@5", "eval/ndcg@5"):
        a, b = losses(single_dir, name), losses(multi_dir, name)
        assert a.keys() == b.keys() and a, name
        np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=2e-5, err_msg=name)
    from safetensors.torch import load_file  # the export is bfloat16, which numpy lacks

    one_w, two_w = (load_file(d / "hf" / "model.safetensors") for d in (single_dir, multi_dir))
    assert one_w.keys() == two_w.keys()
    for key in one_w:
        np.testing.assert_allclose(two_w[key].float().numpy(), one_w[key].float().numpy(), atol=1e-2, err_msg=key)


def _checkpoint_params(run_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "default")["params"]


def test_early_stopping_exports_the_best_checkpoint_also_after_a_resume(tiny_qwen2, tmp_path):
    """MiniOneRec's model selection (Hugging Face's load_best_model_at_end + EarlyStoppingCallback):
    with a learning rate too high the eval loss rises, the run stops `patience` evaluations after its
    best and exports the best step's weights (their logits are that checkpoint's); a run resumed in
    between (its best and patience rebuilt from the checkpoint's metrics) stops and exports the same."""
    import jax
    import ml_dtypes
    import torch
    import transformers

    from mllm_jax.models import hf
    from mllm_jax.models.qwen2 import Qwen2

    common = ["run_mode=train", "train.learning_rate=3e-2", "train.lr_schedule=constant", "train.warmup_steps=0",
              "train.eval_every=2", "train.early_stopping_patience=2", "train.log_every=2", "train.checkpoint_every=2",
              "train.keep_checkpoints=50", "data.sample_train=32", "data.sample_eval=32"]
    out, run_dir = run_sft(tiny_qwen2, tmp_path, "stops", *common, "train.max_steps=40")
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    evals = summary["eval_losses"]
    best = min(evals, key=lambda e: e["loss"])
    stop = summary["early_stopped_at"]
    assert summary["status"] == "completed" and summary["final_step"] == stop == best["step"] + 2 * 2 < 40
    assert [e["step"] for e in evals] == list(range(2, stop + 1, 2)) and evals[-1]["loss"] > best["loss"]
    assert summary["best_checkpoint"] == {"metric": "eval/loss", "step": best["step"], "value": best["loss"],
                                          "dir": str(run_dir.absolute() / "checkpoints" / "best")}
    assert f"early stopping at step {stop}" in out.stdout

    # hf/ holds the best step's weights (bfloat16), not the last step's.
    cfg = hf.load_config(run_dir / "hf")
    mesh = jax.make_mesh((1, 1, 1), ("dp", "fsdp", "tp"), devices=jax.devices()[:1])
    exported, cfg = hf.load_params(run_dir / "hf", cfg, mesh, np.float32)
    bf16 = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), tree)  # noqa: E731
    rows = lambda tree: {**tree, "embed_tokens": {"embedding": tree["embed_tokens"]["embedding"][:cfg.vocab_size]}}  # noqa: E731
    best_params = _checkpoint_params(run_dir, best["step"])
    for a, b in zip(jax.tree.leaves(rows(exported)), jax.tree.leaves(rows(bf16(best_params)))):
        np.testing.assert_array_equal(a, b)
    last = bf16(_checkpoint_params(run_dir, stop))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(last)))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch_logits = theirs(torch.tensor(ids)).logits.numpy()
    ours, _ = Qwen2(cfg).apply({"params": bf16(best_params)}, ids)
    np.testing.assert_allclose(np.asarray(ours)[..., :cfg.vocab_size], torch_logits, atol=1e-4)

    # Stopped (here: its end) between the best and the early stop, then resumed to the same end.
    early, early_dir = run_sft(tiny_qwen2, tmp_path, "resumed", *common, f"train.max_steps={stop - 2}")
    assert early.returncode == 0, early.stderr
    resumed = run_trainer(*sft_args(tiny_qwen2, *common, "train.max_steps=40", f"output_dir={early_dir}"),
                          "--resume", cwd=tmp_path, recipe="sft")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((early_dir / "run_summary.json").read_text())
    assert (again["early_stopped_at"], again["best_checkpoint"]["step"]) == (stop, best["step"])
    assert (early_dir / "hf" / "model.safetensors").read_bytes() == (run_dir / "hf" / "model.safetensors").read_bytes()
