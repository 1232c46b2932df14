"""The `mllm` command: thin Typer commands; the work lives in plain functions elsewhere."""

from __future__ import annotations

from typing import Optional

import typer

from mllm_jax import __version__

app = typer.Typer(help="Train LLMs with JAX, locally or on Cloud TPU VMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mllm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """mllm: provision TPU VMs, sync code, launch and follow training runs."""


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe to train, e.g. nanogpt."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the run dir."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    env_file: Optional[str] = typer.Option(None, "--env-file", help="KEY=VALUE file to load (default: ./.env if present)."),
) -> None:
    """Train RECIPE in this process, exactly as `python -m mllm_jax train` does on a VM."""
    from mllm_jax.train import run_cli, train as run_train

    code = run_cli(lambda: run_train(recipe, config, overrides, resume, print_config, env_file))
    raise typer.Exit(code)
