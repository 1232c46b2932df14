"""Config loading: typed values, overrides, `base:` files, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMOKE, run_trainer
from mllm_jax.config import ConfigError, config_hash, load_config, to_yaml
from mllm_jax.recipes.nanogpt import Config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    cfg_file = write(tmp_path / "c.yaml", "train:\n  learning_rate: 3e-4\n  max_steps: 7\nwandb:\n  tags: [a]\n")
    text = write(tmp_path / "my text.txt", "hello")
    cfg = load_config(Config, cfg_file, ["model.n_layer=3", "train.min_lr=1e-5", f"data.path={text}",
                                         "sample.top_k=null", "model.bias=true"])
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.min_lr == 1e-5 and cfg.train.max_steps == 7 and cfg.model.n_layer == 3
    assert cfg.data.path == str(text) and cfg.sample.top_k is None and cfg.model.bias is True
    assert cfg.wandb.tags == ["a"]
    # Defaults fill what the file leaves out.
    assert cfg.model.n_embd == Config().model.n_embd


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("train:\n  max_step: 5\n", [], "unknown config key train.max_step; did you mean train.max_steps?"),
        ("trian:\n  max_steps: 5\n", [], "unknown config key trian; did you mean train?"),
        ("", ["train.max_steps=abc"], "train.max_steps: expected int, got 'abc'"),
        ("train:\n  learning_rate: fast\n", [], "train.learning_rate: expected float, got 'fast'"),
        ("model:\n  bias: 1\n", [], "model.bias: expected bool, got 1"),
        ("wandb:\n  mode: sometimes\n", [], "wandb.mode: expected one of online, offline, disabled, got 'sometimes'"),
        ("", ["jax.mesh_shape=2,2"], "jax.mesh_shape: expected 'auto', '1,-1,1' or 'dp:1,fsdp:-1,tp:1'"),
        ("", ["model.n_head=3"], "model.n_embd=128 must be divisible by model.n_head=3"),
        ("", ["train.max_steps"], "--set 'train.max_steps': expected KEY=VALUE"),
        ("model: 3\n", [], "model: expected a mapping"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Config, write(tmp_path / "c.yaml", text), override)
    assert message in str(e.value)


def test_base_file_is_merged_under_the_child(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  max_steps: 100\n  eval_every: 10\nmodel:\n  n_layer: 6\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 50\n")
    cfg = load_config(Config, child)
    assert (cfg.train.max_steps, cfg.train.eval_every, cfg.model.n_layer) == (50, 10, 6)


def test_config_hash_covers_settings_not_the_run_dir():
    a = load_config(Config, str(SMOKE), ["output_dir=runs/a"])
    b = load_config(Config, str(SMOKE), ["output_dir=runs/b"])
    c = load_config(Config, str(SMOKE), ["output_dir=runs/a", "train.learning_rate=0.5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_shipped_configs_load():
    for path in sorted((REPO / "configs" / "nanogpt").glob("*.yaml")):
        load_config(Config, path)
    # The regression config is the seed's tinyshakespeare_char_v6e_8_refactor_regression_1500steps.yaml
    # (its values, key by key); the standard config keeps its 5000-step schedule and float32 compute.
    r = load_config(Config, REPO / "configs" / "nanogpt" / "v6e8_regression_1500.yaml")
    seed = {"seed": 1337, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2, "bias": False,
            "param_dtype": "float32", "compute_dtype": "bfloat16", "max_steps": 1500, "decay": 1500,
            "global_batch_size": 64, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "weight_decay": 0.1,
            "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0, "eval_every": 250, "eval_iters": 200}
    ours = {"seed": r.seed, **{k: getattr(r.model, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout",
                                                                "bias")},
            "param_dtype": r.jax.param_dtype, "compute_dtype": r.jax.compute_dtype, "decay": r.train.lr_decay_steps,
            **{k: getattr(r.train, k) for k in ("max_steps", "global_batch_size", "learning_rate", "min_lr",
                                                "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                                                "eval_every", "eval_iters")}}
    assert ours == seed
    assert r.wandb.mode == "online" and r.wandb.project == "nano-gpt-jax"
    standard = load_config(Config, REPO / "configs" / "nanogpt" / "v6e8.yaml")
    assert standard.train.max_steps == standard.train.lr_decay_steps == 5000 and standard.jax.compute_dtype == "float32"


def test_shipped_sft_configs_load():
    from mllm_jax.config import to_dict
    from mllm_jax.data import sid
    from mllm_jax.recipes.sft import Config as SftConfig

    loaded = {p.name: load_config(SftConfig, p) for p in sorted((REPO / "configs" / "sft").glob("*.yaml"))}
    for name in ("cpu_smoke.yaml", "v6e8.yaml", "v6e8_office.yaml", "v6e8_base.yaml", "v6e8_office_base.yaml"):
        cfg = loaded[name]  # MiniOneRec's five SFT tasks, and the category its title tasks name
        assert cfg.tasks.enabled() == list(sid.TASKS), name
        assert cfg.data.category == ("Office_Products" if "office" in name else "Industrial_and_Scientific"), name
    as_dict = {name: to_dict(cfg) for name, cfg in loaded.items()}
    industrial, office = as_dict["v6e8.yaml"], as_dict["v6e8_office.yaml"]
    paths = {k: office["data"][k] for k in ("train_file", "eval_file", "test_file", "sid_index_path", "item_meta_path")}
    assert all(p.startswith("workdir/MiniOneRec/data/Amazon/") and "/Office_Products" in p for p in paths.values())
    # each derived config changes only what its name says
    assert office == {**industrial, "data": {**industrial["data"], **paths, "category": "Office_Products"}}
    assert as_dict["v6e8_base.yaml"] == {**as_dict["v6e8.yaml"], "base_model": "Qwen/Qwen2.5-1.5B"}
    assert as_dict["v6e8_office_base.yaml"] == {**office, "base_model": "Qwen/Qwen2.5-1.5B"}
    with pytest.raises(ConfigError) as e:
        load_config(SftConfig, REPO / "configs" / "sft" / "v6e8.yaml", ["data.category=Toys"])
    assert str(e.value) == ("data.category: expected one of Industrial_and_Scientific, Office_Products, "
                            "Toys_and_Games, Sports, Books, got 'Toys'")


def test_print_config_prints_resolved_yaml_and_exits(tmp_path):
    out = run_trainer("--config", str(SMOKE), "--set", "train.max_steps=3", "--print-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["max_steps"] == 3 and printed["model"]["n_layer"] == 2
    assert out.stdout == to_yaml(load_config(Config, SMOKE, ["train.max_steps=3"]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (["--set", "train.max_stepz=3"], 1, "error: unknown config key train.max_stepz; did you mean train.max_steps?"),
        (["--set", "data.path=/no/such/file.txt"], 1, "error: data.path: file not found: /no/such/file.txt"),
        (["--set", "train.global_batch_size=12"], 8,
         "error: train.global_batch_size=12 is not divisible by the data-parallel size 8"),
        (["--set", "jax.mesh_shape=dp:3,fsdp:1,tp:1"], 8, "error: jax.mesh_shape 'dp:3,fsdp:1,tp:1' needs 3 devices, found 8"),
        (["--env-file", "missing.env"], 1, "error: --env-file: file not found: missing.env"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, shakespeare, args, devices, message):
    out = run_trainer("--config", str(SMOKE), "--set", f"data.path={shakespeare}", *args, cwd=tmp_path,
                      devices=devices)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [message + out.stderr.strip()[len(message):]]
    assert out.stderr.startswith(message) and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists(), "nothing is created for bad input"
