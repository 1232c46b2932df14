"""`train RECIPE` (and `tiny-model DIR`): load the config, join the other processes, build the mesh, run the loop.

Both `python -m mllm_jax train` (on a VM) and the laptop's `mllm train` end up in `train()`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from mllm_jax import config as config_lib
from mllm_jax import contracts
from mllm_jax.config import ConfigError
from mllm_jax.contracts import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_OK, EXIT_STOPPED
from mllm_jax.recipes import RECIPES


def train(recipe: str, config: str | None = None, overrides: list[str] = (), resume: bool = False,
          print_config: bool = False, env_file: str | None = None, resume_if_any: bool = False,
          allow_config_change: tuple[str, ...] = ()) -> int:
    """Run one recipe; returns the process exit code (contracts: EXIT_OK done, EXIT_STOPPED stopped).
    Raises ConfigError for bad input, before any compute where it can be known then.
    `resume_if_any`: resume, or start from step 0 in the same run dir when there is no complete
    checkpoint yet (how the recovery supervisor relaunches a run preempted before its first).
    `allow_config_change`: with a resume, settings that may differ from the checkpoint's."""
    resume = resume or resume_if_any
    if allow_config_change and not resume:
        raise ConfigError("--allow-config-change: only with --resume (a new run has nothing to differ from)")
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"--env-file: file not found: {env_file}")
    module = importlib.import_module(RECIPES[recipe])
    cfg = config_lib.load_config(module.Config, config, list(overrides))
    if print_config:
        print(config_lib.to_yaml(cfg), end="")
        return EXIT_OK
    check_output_dir(cfg.output_dir, resume and not resume_if_any and not cfg.train.checkpoint_dir)
    env_path = env_file or (".env" if Path(".env").is_file() else None)
    if env_path:
        from mllm_jax.envfile import load_env_file

        keys = load_env_file(env_path)
        print(f"loaded {len(keys)} variable(s) from {env_path}: {', '.join(keys) or '-'}", flush=True)

    import jax  # JAX is imported from here on

    from mllm_jax import runtime, trainer
    from mllm_jax.tracking import check_wandb_credentials

    check_wandb_credentials(cfg.wandb)
    runtime.init_distributed(cfg.jax.distributed_timeout_sec)  # before anything touches the backend
    if jax.process_count() > 1 and not cfg.train.checkpoint_dir:
        raise ConfigError(
            f"train.checkpoint_dir: a run of {jax.process_count()} processes needs a directory every worker "
            "shares (e.g. gs://bucket/path); the run dir is on each worker's own disk"
        )
    runtime.tune_host_allocator()
    mesh = runtime.make_mesh(cfg.jax.mesh_shape)
    make_task = module.build(cfg, mesh)  # bad input is refused here, before the run dir exists
    run_dir = trainer.resolve_run_dir(recipe, cfg.output_dir, resume)
    cfg.output_dir = str(run_dir)
    info = trainer.RunInfo(recipe=recipe, run_dir=run_dir, config=cfg, config_path=config, mesh=mesh, resume=resume,
                           start_if_no_checkpoint=resume_if_any, allow_config_change=tuple(allow_config_change))
    result = trainer.run(info, make_task)
    if result["status"] == "stopped":
        return EXIT_STOPPED
    return EXIT_OK


def check_output_dir(output_dir: str | None, resume: bool) -> None:
    """Refuse, before anything is built or written, a run dir that cannot be one: a file, a
    missing dir to --resume (`resume`: the checkpoints are in it; a run whose checkpoints live
    elsewhere, e.g. on a bucket, may resume on a new machine into a fresh run dir), or a place
    this process cannot write."""
    path = Path(output_dir or contracts.RUNS_DIR)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path}: exists and is not a directory")
    if resume and output_dir and not path.is_dir():
        raise ConfigError(f"--resume: output_dir {path} does not exist (give the run dir to continue)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir {path}: cannot write in {parent} ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllm_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    p.add_argument("--resume-if-any", action="store_true",
                   help="like --resume, but start from step 0 when there is no complete checkpoint yet")
    p.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                   help="with --resume: let this setting (or section) differ from the checkpoint's although it "
                        "changes the model, data or numerics (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--env-file", help="KEY=VALUE file to load (default: ./.env if present)")
    p.add_argument("--run-mode", choices=["train", "eval", "train_eval"],
                   help="sft: train, evaluate only, or both (the same as --set run_mode=...)")
    t = sub.add_parser("tiny-model", help="write a tiny random Qwen2 in Hugging Face format (for CPU smoke runs)")
    t.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer.json)")
    f = sub.add_parser("preflight", help="compile the recipe's programs for a TPU slice here (libtpu, no TPU): "
                                          "per-chip HBM, compile time, XLA's estimate; exit 1 when it does not fit")
    f.add_argument("recipe", help=f"one of: {', '.join(RECIPES)}")
    f.add_argument("--config", help="YAML config file")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    f.add_argument("--type", dest="accelerator_type", default="v6e-8", help="accelerator type, e.g. v6e-8, v4-16")
    f.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    f.add_argument("--no-cache", action="store_true", help="compile again even when a cached report exists")
    f.add_argument("--no-estimate", action="store_true",
                   help="skip XLA's cost-model estimate (its loop bodies compile one by one): memory only, faster")
    e = sub.add_parser("env-exec", help="run a command with an env file's variables (dotenv parsing, as train's "
                                        "--env-file; `mllm exec --env-file` uses it: the file is never run as shell)")
    e.add_argument("env_file")
    e.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    b = sub.add_parser("bucket-probe", help="write, read back and delete a small object under gs://BUCKET[/PREFIX] "
                                            "with the trainer's credentials; one JSON line {ok, status, error}")
    b.add_argument("url", metavar="gs://BUCKET[/PREFIX]")
    b.add_argument("--env-file", help="KEY=VALUE file to load first, as train's (default: ./.env if present)")
    args = parser.parse_args(argv)
    if args.command == "bucket-probe":
        from mllm_jax import bucket_probe

        return run_cli(lambda: bucket_probe.main(args.url, args.env_file))
    if args.command == "env-exec":
        return run_cli(lambda: env_exec(args.env_file, args.argv))
    if args.command == "preflight":
        from mllm_jax import preflight

        return run_cli(lambda: preflight.main(args.recipe, args.config, args.overrides, args.accelerator_type,
                                              args.as_json, not args.no_cache, not args.no_estimate))
    if args.command == "tiny-model":
        from mllm_jax.models.tiny import write_tiny_model

        print(f"wrote a tiny random Qwen2 to {write_tiny_model(args.out_dir)}")
        return 0
    overrides = args.overrides + ([f"run_mode={args.run_mode}"] if args.run_mode else [])
    return run_cli(lambda: train(args.recipe, args.config, overrides, args.resume, args.print_config,
                                 args.env_file, args.resume_if_any, tuple(args.allow_config_change)))


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, raised as OSError or wrapped by tensorstore/orbax (`os_error_code='28'`)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def env_exec(env_file: str, command: list[str]) -> int:
    """Replace this process with `command`, its environment extended by the env file."""
    from mllm_jax.envfile import load_env_file

    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise ConfigError("env-exec: no command given (env-exec FILE -- CMD ARGS...)")
    if not Path(env_file).is_file():
        raise ConfigError(f"--env-file: file not found: {env_file}")
    load_env_file(env_file)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise ConfigError(f"{command[0]}: cannot run it ({e.strerror})") from None


def run_cli(fn: Callable[[], int]) -> int:
    """Bad input becomes one line on stderr and exit code 2, with no traceback."""
    try:
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not _disk_full(e):
            raise
        # The run's summary says the rest; leave at once (orbax's writer threads would print
        # hundreds of lines while the interpreter shuts down under them).
        print(f"error: no space left on the device ({str(e).splitlines()[0][:300]}); free some and `--resume`",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CRASHED)
