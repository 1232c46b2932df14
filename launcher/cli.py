"""The `mllm` command: thin Typer commands; the work lives in plain functions elsewhere."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Optional

import typer

from launcher import state
from launcher.errors import LauncherError
from mllm_jax import __version__

if TYPE_CHECKING:  # imported lazily at run time: `mllm --help` stays fast
    from launcher import cloud, ssh

app = typer.Typer(help="Train LLMs with JAX, locally or on Cloud TPU VMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


vm_app = typer.Typer(help="Create, list, describe and delete TPU VMs (Cloud TPU API).", no_args_is_help=True)
app.add_typer(vm_app, name="vm")


def run() -> None:
    """Console entry point: launcher errors are one line on stderr and exit code 2."""
    try:
        app()
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


VmOpt = typer.Option(None, "--vm", help="TPU VM name (default: the last one used, or $MLLM_VM).")
ZoneOpt = typer.Option(None, "--zone", help="Zone, e.g. us-east1-d (default: last used, or $MLLM_ZONE).")
ProjectOpt = typer.Option(None, "--project", help="GCP project (default: $MLLM_PROJECT, $CLOUDSDK_CORE_PROJECT, ADC).")
TimeoutOpt = typer.Option(900.0, "--timeout", help="Seconds to wait for the operation.")


def _zone(zone: Optional[str], project: Optional[str]) -> "cloud.Zone":
    from launcher import cloud

    zone = cloud.check_zone(state.resolve("zone", zone, "--zone"))
    project = cloud.resolve_project(state.resolve("project", project, "--project", required=False))
    return cloud.Zone(project, zone, cloud.make_client())


def _node_row(node, now: float) -> dict:  # type: ignore[no-untyped-def]
    from launcher import cloud

    created = node.create_time.timestamp() if node.create_time else now
    return {
        "name": node.name.rsplit("/", 1)[-1],
        "zone": node.name.split("/")[3],
        "type": node.accelerator_type,
        "state": node.state.name,
        "health": node.health.name if node.health else "",
        "workers": len(node.network_endpoints),
        "ips": cloud.worker_ips(node),
        "spot": bool(node.scheduling_config.spot or node.scheduling_config.preemptible),
        "age_sec": int(now - created),
        "runtime_version": node.runtime_version,
    }


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@vm_app.command("create")
def vm_create(
    name: Optional[str] = typer.Argument(None, help="VM name (default mllm-<type>-<yymmddHHMMSS>)."),
    zone: Optional[str] = ZoneOpt,
    project: Optional[str] = ProjectOpt,
    accelerator_type: str = typer.Option("v6e-8", "--type", help="Accelerator type, e.g. v6e-8, v5litepod-16."),
    version: str = typer.Option("auto", "--version", help="Runtime version; auto picks the generation's default."),
    spot: bool = typer.Option(True, "--spot/--on-demand", help="Spot capacity (default) or on-demand."),
    no_wait: bool = typer.Option(False, "--async", help="Return once the request is accepted."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be created and stop."),
    timeout: float = TimeoutOpt,
) -> None:
    """Create a TPU VM whose workers accept the launcher's SSH key as root."""
    from launcher import cloud, keys

    cloud.check_type(accelerator_type)
    name = cloud.check_name(name or f"mllm-{accelerator_type}-{time.strftime('%y%m%d%H%M%S', time.gmtime())}")
    version = cloud.runtime_version(accelerator_type, version)
    z = _zone(zone, project)
    plan = {"name": name, "project": z.project, "zone": z.zone, "type": accelerator_type, "version": version,
            "spot": spot, "labels": {"created-by": "mllm"}}
    if dry_run:
        typer.echo(json.dumps(plan, indent=2))
        return
    _, public_key = keys.ensure_key()
    node = z.create(name, accelerator_type, version, spot, public_key, timeout, wait=not no_wait)
    state.remember(vm=name, zone=z.zone, project=z.project)
    if node is None:
        typer.echo(f"requested {name} ({accelerator_type}) in {z.zone}; see `mllm vm describe --vm {name}`")
    else:
        typer.echo(f"created {name} ({accelerator_type}, {version}) in {z.zone}: {node.state.name}, "
                   f"workers {', '.join(cloud.worker_ips(node))}")


@vm_app.command("list")
def vm_list(zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the TPU VMs in a zone."""
    z = _zone(zone, project)
    now = time.time()
    rows = [_node_row(n, now) for n in z.list()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "zone", "type", "state", "health", "workers", "IPs", "spot", "age")
    for r in rows:
        table.add_row(r["name"], r["zone"], r["type"], r["state"], r["health"], str(r["workers"]),
                      " ".join(r["ips"]), "yes" if r["spot"] else "no", _age(r["age_sec"]))
    Console().print(table)


@vm_app.command("describe")
def vm_describe(vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt) -> None:
    """Print one TPU VM as JSON."""
    z = _zone(zone, project)
    name = state.resolve("vm", vm, "--vm")
    row = _node_row(z.get(name), time.time())
    state.remember(vm=name, zone=z.zone, project=z.project)
    typer.echo(json.dumps(row, indent=2))


@vm_app.command("delete")
def vm_delete(
    vm: Optional[str] = VmOpt,
    zone: Optional[str] = ZoneOpt,
    project: Optional[str] = ProjectOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    preempted: bool = typer.Option(False, "--preempted", help="Delete every PREEMPTED TPU VM in the zone."),
    timeout: float = TimeoutOpt,
) -> None:
    """Delete a TPU VM (or all preempted ones in the zone)."""
    z = _zone(zone, project)
    if preempted:
        names = [n.name.rsplit("/", 1)[-1] for n in z.list() if n.state.name == "PREEMPTED"]
    else:
        names = [state.resolve("vm", vm, "--vm")]
        z.get(names[0])  # a missing VM is an error before asking anything
    if not names:
        typer.echo(f"no preempted TPU VMs in {z.zone}")
        return
    if not yes and not typer.confirm(f"Delete {', '.join(names)} in {z.zone}?"):
        raise typer.Exit(1)
    for name in names:
        z.delete(name, timeout)
        typer.echo(f"deleted {name}")


env_app = typer.Typer(help="Secrets for the workers (.env files).", no_args_is_help=True)
app.add_typer(env_app, name="env")
WorkerOpt = typer.Option("all", "--worker", "-w", help="Workers: all, an index (0) or a list (1,3).")
InternalOpt = typer.Option(False, "--internal-ip", help="Connect to the workers' internal IPs.")
UserOpt = typer.Option("root", "--user", help="SSH user on the workers.")


def _workers(vm: Optional[str], zone: Optional[str], project: Optional[str], internal_ip: bool,
             worker: str, user: str) -> "tuple[list[ssh.Worker], ssh.Connections]":
    """The VM's selected workers (with their published host keys) and a connection pool."""
    from launcher import cloud, keys, ssh

    z = _zone(zone, project)
    name = cloud.check_name(state.resolve("vm", vm, "--vm"))
    node = z.get(name)
    if node.state.name != "READY":
        raise LauncherError(f"TPU VM {name} is {node.state.name}, not READY")
    host_keys = z.host_keys(name)
    workers = [ssh.Worker(i, ip, host_keys=host_keys.get(i, {}))
               for i, ip in enumerate(cloud.worker_ips(node, internal=internal_ip))]
    selected = ssh.select_workers(workers, worker)
    state.remember(vm=name, zone=z.zone, project=z.project)
    key_file, _ = keys.ensure_key()
    return selected, ssh.Connections(user, key_file, keys.config_dir() / "known_hosts")


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    ctx: typer.Context,
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    env_file: Optional[str] = typer.Option(None, "--env-file", help="Source this pushed env file on the worker first."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop the other workers once one fails."),
) -> None:
    """Run a command on workers in parallel: mllm exec --worker all -- CMD ARGS..."""
    import shlex

    from launcher import ssh

    argv = list(ctx.args)
    if not argv:
        raise LauncherError("no command given: mllm exec [options] -- CMD ARGS...")
    command = shlex.join(argv)
    if env_file:
        command = f"set -a && . {shlex.quote(env_file)} && set +a && {command}"
    workers, conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        code = ssh.exec_all(conns, workers, command, fail_fast=fail_fast)
    raise typer.Exit(code)


@app.command("ssh")
def ssh_cmd(vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
            worker: str = typer.Option("0", "--worker", "-w", help="Worker index."),
            internal_ip: bool = InternalOpt, user: str = UserOpt) -> None:
    """Interactive shell on one worker (the system ssh, with the launcher's key and verified host key)."""
    import os

    from launcher import keys

    if worker == "all" or "," in worker:
        raise LauncherError("--worker: mllm ssh opens one shell; give one index")
    (w,), conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        conns.client(w)  # verifies the host key (published or first use) before handing over
    key_file, _ = keys.ensure_key()
    known = keys.config_dir() / ("known_hosts.published" if w.host_keys else "known_hosts")
    if w.host_keys:
        known.write_text("".join(f"{w.host} {t} {k}\n" for t, k in w.host_keys.items()))
    os.execvp("ssh", ["ssh", "-i", str(key_file), "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                      "-o", "IdentitiesOnly=yes", f"{user}@{w.host}"])


@env_app.command("push")
def env_push(
    src: str = typer.Option(".env", "--src", help="Local env file (KEY=VALUE lines)."),
    dest: str = typer.Option("/root/.env", "--dest", help="Path of the env file on the workers."),
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
) -> None:
    """Copy an env file to the workers over SFTP (mode 0600); prints key names only."""
    from pathlib import Path

    from launcher import remote, ssh

    content, names = remote.normalized_env(Path(src))
    workers, conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        ssh.fan_out(workers, lambda w: remote.push_env(conns, w, content, dest))
    for w in workers:
        ssh.emit(w.label, f"{dest} (0600): {', '.join(names)}")


@app.command("bootstrap")
def bootstrap_cmd(
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    venv: str = typer.Option("/root/mllm-venv", "--venv", help="Virtualenv to create on each worker."),
    python: Optional[str] = typer.Option(None, "--python", help="Use this existing interpreter instead of a venv."),
) -> None:
    """Set up each worker's Python so that `python -m mllm_jax` runs (idempotent)."""
    from launcher import remote, ssh

    workers, conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        chosen = ssh.fan_out(workers, lambda w: remote.bootstrap(conns, w, venv, python))
    for i, interpreter in chosen.items():
        ssh.emit(f"w{i}", f"ready: {interpreter}")


@app.command("versions")
def versions_cmd(
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Python, JAX stack, backend, devices, OS and kernel of each worker."""
    from launcher import remote, ssh

    workers, conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        found = ssh.fan_out(workers, lambda w: remote.versions(conns, w))
    if as_json:
        typer.echo(json.dumps({str(i): v for i, v in found.items()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    cols = ["python", "jax", "jaxlib", "flax", "optax", "wandb", "backend", "device_count", "os", "kernel"]
    table = Table("worker", *cols)
    for i, v in found.items():
        table.add_row(str(i), *[str(v.get(c)) for c in cols])
    Console().print(table)
