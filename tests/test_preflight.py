"""Preflight: the recipes' real programs compiled by libtpu's TPU compiler on this CPU machine
for real TPU topologies (one host and two), the report and its cache, and `mllm launch`
refusing a config that cannot fit before the VM or the cloud sees anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import INDUSTRIAL_INDEX, REPO, launcher_env, mllm
from harness.tpu_slice import ZONE, Slice
from mllm_jax import preflight
from mllm_jax.config import ConfigError
from mllm_jax.models.tiny import QWEN2_5_1_5B, write_shapes_model

STEP_TIME = str(REPO / "configs" / "sft" / "v6e8_step_time.yaml")


@pytest.fixture(scope="module")
def qwen_width(tmp_path_factory) -> str:
    """Qwen2.5-1.5B's config.json values (hidden, heads, vocab) at 2 layers, no weights."""
    return str(write_shapes_model(tmp_path_factory.mktemp("models") / "qwen2.5-1.5b-2l", num_hidden_layers=2))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> str:
    """A narrow Qwen2 (hidden 256, head_dim 128, vocab 16k) at 2 layers: compiles in a third of the time."""
    return str(write_shapes_model(tmp_path_factory.mktemp("models") / "qwen2-narrow", num_hidden_layers=2,
                                  hidden_size=256, intermediate_size=512, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=16384))


def sop_sets(model_dir: str, *extra: str) -> list[str]:
    # The SID index is on the VM only (as for a user's laptop): the vocabulary is config.json's.
    items = [f"base_model={model_dir}", "data.sid_index_path=workdir/not-on-this-machine.json", *extra]
    return [a for item in items for a in ("--set", item)]


@pytest.fixture()
def env(tmp_path):
    return launcher_env(tmp_path, "http://127.0.0.1:9")  # no cloud call may happen: nothing listens there


def test_sop_step_compiles_for_v6e8_and_a_two_host_v4(qwen_width, narrow, tmp_path, env):
    """The SOP's step at Qwen2.5-1.5B's width fits a v6e-8 (memory only, as `mllm launch` checks
    it); a narrower model on two v4 hosts with the Pallas splash kernel gets XLA's estimate too."""
    run = lambda model, *a: mllm("preflight", "sft", "--config", STEP_TIME, *sop_sets(model), *a,  # noqa: E731
                                 cwd=tmp_path, env=env, timeout=900)
    out = run(qwen_width, "--type", "v6e-8", "--json", "--no-cache", "--no-estimate")  # compiled now, and cached
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert (r["chips"], r["hosts"], r["device_kind"], r["mesh"]) == (8, 1, "TPU v6 lite", {"dp": 1, "fsdp": 8, "tp": 1})
    assert r["fits"] and not r["cached"] and r["libtpu"].startswith("0.0.")
    assert r["facts"]["vocab"].startswith(f"{QWEN2_5_1_5B['vocab_size']} padded")
    step, evals = r["programs"]
    assert (step["name"], evals["name"]) == ("train_step", "eval_loss")
    m = step["memory"]
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
    assert m["alias"] > 0.9 * m["argument"], "the train state is donated"
    # The chunked loss keeps the step far from the 27 GiB of the float32 logits: < 40% of a chip.
    assert 0 < step["share"] < 0.4 and evals["share"] < 0.4
    assert step["estimate"] is None and evals["estimate"] is None  # --no-estimate

    text = run(qwen_width, "--type", "v6e-8", "--no-estimate")  # the same inputs again: the cached report, for humans
    assert text.returncode == 0, text.stderr
    assert "[cached]" in text.stdout and "XLA cost-model estimate" not in text.stdout
    assert "train_step" in text.stdout and "% of HBM" in text.stdout and "fits a v6e-8" in text.stdout

    two = run(narrow, "--type", "v4-16", "--set", "train.attention=splash", "--json", "--no-cache")  # 2 hosts x 4 chips
    assert two.returncode == 0, two.stdout + two.stderr
    r2 = json.loads(two.stdout)
    assert (r2["chips"], r2["hosts"], r2["device_kind"]) == (8, 2, "TPU v4") and r2["fits"]
    step, evals = r2["programs"]
    e = step["estimate"]  # summed over the loop bodies; XLA's cost model, labelled as such
    assert e["seconds"] > 0 and e["flops_per_chip"] > 0 and 0 < e["mfu"] <= 1
    assert evals["estimate"] is None, "a program with loops gets no estimate of its own"
    text = run(narrow, "--type", "v4-16", "--set", "train.attention=splash")
    assert "[cached]" in text.stdout and "XLA cost-model estimate (not a measurement)" in text.stdout, text.stdout


def test_rl_update_rollout_and_scoring_compile_for_v6e8(narrow, tmp_path, env):
    """rl's programs for configs/rl/v6e8.yaml (rl.sh's shape) on a narrow 2-layer Qwen2: the update
    over the step's micro-batches (policy, reference and Adam state sharded over fsdp; the state
    donated), one micro-batch's 16-beam rollout and the reference scoring forward, each fits a chip."""
    out = mllm("preflight", "rl", "--config", str(REPO / "configs" / "rl" / "v6e8.yaml"),
               "--set", f"base_model={narrow}", "--set", f"data.sid_index_path={INDUSTRIAL_INDEX}",
               "--type", "v6e-8", "--json", "--no-cache", "--no-estimate", cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["fits"] and r["mesh"] == {"dp": 1, "fsdp": 8, "tp": 1}
    assert (r["facts"]["micro_batch"], r["facts"]["accumulation"], r["facts"]["generations"]) == (32, 2, 16)
    update, rollout, score = r["programs"]
    assert (update["name"], rollout["name"], score["name"]) == ("update", "rollout", "score")
    assert update["memory"]["alias"] > 0.9 * update["memory"]["argument"], "the train state is donated"
    assert all(0 < p["share"] < 0.5 for p in r["programs"])


def test_a_config_that_cannot_fit_is_reported_with_the_knob(qwen_width, tmp_path, env):
    """Micro-batch 256 per chip at 512 tokens: the TPU compiler refuses it; the report says how
    much was needed, what a chip has and what to turn; the command exits 1."""
    out = mllm("preflight", "sft", "--config", STEP_TIME,
               *sop_sets(qwen_width, "train.per_device_train_batch_size=256", "train.global_batch_size=2048"),
               "--type", "v6e-8", "--no-cache", cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("sft does not fit a v6e-8 (TPU v6 lite, 32.00 GiB HBM per chip): train_step needs at least")
    assert "GiB of HBM per chip, 31.25 GiB available" in last and "train.per_device_train_batch_size (now 256" in last
    assert "DOES NOT FIT" in out.stdout


def test_bad_input_is_one_line(qwen_width, tmp_path, env):
    for args, want in [
        (["sft", "--config", STEP_TIME, "--type", "v9x-8"], "--type 'v9x-8': preflight knows v4-8,"),
        (["sft", "--config", STEP_TIME, "--set", "train.attention=flash"], "train.attention"),
        (["nope", "--type", "v6e-8"], "unknown recipe 'nope'"),
    ]:
        out = mllm("preflight", *args, cwd=tmp_path, env=env)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and want in out.stderr, (args, out.stderr)


def test_libtpu_exists_for_linux_x86_64_only(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(preflight.platform, "machine", lambda: "arm64")
    with pytest.raises(ConfigError, match=r"built for Linux x86-64 only \(this is darwin arm64\)"):
        preflight.libtpu_library()


@pytest.mark.e2e
def test_launch_refuses_an_unfittable_config_before_touching_the_vm(hosts, qwen_width, tmp_path):
    """`mllm launch` compiles the config for the VM's type first: micro 256 per chip cannot fit a
    v6e-8, so it exits 2 with one line, and the cloud saw only reads, no worker a login."""
    repo = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        env.pop("MLLM_NO_PREFLIGHT")
        assert mllm("vm", "create", "big", "--zone", ZONE, "--type", "v6e-8", cwd=repo, env=env).returncode == 0
        requests, logins = len(api.requests), [h.log_text().count("Accepted publickey") for h in hosts]
        out = mllm("launch", "sft", "--config", "configs/sft/v6e8_step_time.yaml",
                   *sop_sets(qwen_width, "train.per_device_train_batch_size=256", "train.global_batch_size=2048"),
                   cwd=repo, env=env, timeout=600)
        assert out.returncode == 2, out.stdout + out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: sft does not fit a v6e-8") and "31.25 GiB available" in line, line
        assert "--no-preflight" in line and "[w0]" not in out.stdout
        # Reads only: the node, and its host keys (getGuestAttributes, which the API spells as a POST).
        assert all(r.method == "GET" or r.path.endswith(":getGuestAttributes") for r in api.requests[requests:])
        assert [h.log_text().count("Accepted publickey") for h in hosts] == logins, "a worker was contacted"
