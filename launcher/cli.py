"""The `mllm` command: thin Typer commands; the work lives in plain functions elsewhere."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
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
    run_mode: Optional[str] = typer.Option(None, "--run-mode", help="sft: train, eval or train_eval (= --set run_mode=...)."),
) -> None:
    """Train RECIPE in this process, exactly as `python -m mllm_jax train` does on a VM."""
    from mllm_jax.train import run_cli, train as run_train

    overrides = overrides + ([f"run_mode={run_mode}"] if run_mode else [])
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


@dataclass
class _Vm:
    """A READY TPU VM's workers (with their published host keys) and one connection pool."""

    name: str
    zone: str
    workers: "list[ssh.Worker]"
    internal_ips: list[str]
    conns: "ssh.Connections"


def _vm(vm: Optional[str], zone: Optional[str], project: Optional[str], internal_ip: bool, user: str) -> _Vm:
    from launcher import cloud, keys, ssh

    z = _zone(zone, project)
    name = cloud.check_name(state.resolve("vm", vm, "--vm"))
    node = z.get(name)
    if node.state.name != "READY":
        raise LauncherError(f"TPU VM {name} is {node.state.name}, not READY")
    host_keys = z.host_keys(name)
    workers = [ssh.Worker(i, ip, host_keys=host_keys.get(i, {}))
               for i, ip in enumerate(cloud.worker_ips(node, internal=internal_ip))]
    state.remember(vm=name, zone=z.zone, project=z.project)
    key_file, _ = keys.ensure_key()
    conns = ssh.Connections(user, key_file, keys.config_dir() / "known_hosts")
    return _Vm(name, z.zone, workers, cloud.worker_ips(node, internal=True), conns)


def _workers(vm: Optional[str], zone: Optional[str], project: Optional[str], internal_ip: bool,
             worker: str, user: str) -> "tuple[list[ssh.Worker], ssh.Connections]":
    """The VM's selected workers and a connection pool."""
    from launcher import ssh

    v = _vm(vm, zone, project, internal_ip, user)
    return ssh.select_workers(v.workers, worker), v.conns


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


RunArg = typer.Argument(None, help="Run id (default: the target's runs/latest).")
LocalOpt = typer.Option(False, "--local", help="This machine instead of a TPU VM (runs under ./runs).")


def _targets(local: bool, vm: Optional[str], zone: Optional[str], project: Optional[str], internal_ip: bool,
             worker: str, user: str) -> "tuple[list[jobs.Target], Optional[_Vm]]":  # noqa: F821
    from pathlib import Path

    from launcher import jobs, ssh

    if local:
        return [jobs.LocalTarget(Path.cwd())], None
    v = _vm(vm, zone, project, internal_ip, user)
    return [jobs.RemoteTarget(v.conns, w) for w in ssh.select_workers(v.workers, worker)], v


@contextlib.contextmanager
def _run_on(run: Optional[str], local: bool, vm: Optional[str], zone: Optional[str], project: Optional[str],
            internal_ip: bool, worker: str, user: str):  # type: ignore[no-untyped-def]
    """(targets, vm or None, run id) for commands about one run; the run defaults to runs/latest."""
    from launcher import jobs

    targets, v = _targets(local, vm, zone, project, internal_ip, worker, user)
    with (v.conns if v else contextlib.nullcontext()):
        yield targets, v, run or jobs.latest_run(targets[0])


def _repo_root() -> "Path":  # noqa: F821
    import subprocess
    from pathlib import Path

    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode:
        raise LauncherError("not inside a git repository: mllm sync/launch ship the current repo's commit")
    return Path(out.stdout.strip())


def _sync(v: _Vm, workers: "list[ssh.Worker]", ref: str, include_dirty: bool) -> str:
    from launcher import ssh, sync

    repo = _repo_root()
    sha = sync.resolve_commit(repo, ref, include_dirty)
    results = sync.sync_all(v.conns, workers, repo, sha)
    for r in results:
        ssh.emit(f"w{r.worker}", f"{r.sha[:12]} ({'full' if r.full else 'incremental'}, {r.bytes_sent:,} bytes, "
                                 f"{r.seconds:.2f}s)")
    return sha


@app.command("sync")
def sync_cmd(
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    ref: str = typer.Option("HEAD", "--ref", help="Commit, branch or tag to ship."),
    include_dirty: bool = typer.Option(False, "--include-dirty", help="Ship a snapshot of uncommitted changes."),
) -> None:
    """Make ~/mllm-jax on every worker hold exactly the local commit (over SSH, no GitHub needed)."""
    from launcher import ssh

    v = _vm(vm, zone, project, internal_ip, user)
    with v.conns:
        _sync(v, ssh.select_workers(v.workers, worker), ref, include_dirty)


def _stream_all(targets: "list[jobs.Target]", run_id: str, until_exit: bool) -> None:  # noqa: F821
    """Print every target's log, `[wK]`-prefixed, reconnecting if a connection drops."""
    from launcher import jobs, ssh

    def one(t: "jobs.Target") -> None:  # noqa: F821
        seen = 0

        def line(text: str) -> None:
            nonlocal seen
            seen += 1
            ssh.emit(t.label, text)

        for attempt in range(30):
            try:
                jobs.follow(t, run_id, line, from_line=seen + 1, until_exit=until_exit)
                return
            except (OSError, EOFError) as e:  # dropped connection: pick up where we were
                ssh.emit(t.label, f"(connection lost: {e}; reconnecting)")
                time.sleep(min(2 ** attempt, 10))

    ssh.fan_out(targets, one) if len(targets) > 1 else one(targets[0])


@app.command("launch")
def launch_cmd(
    recipe: str = typer.Argument(..., help="Recipe, e.g. nanogpt."),
    config: str = typer.Option(..., "--config", help="YAML config (inside the repo: it travels with the sync)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key (repeatable)."),
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    no_sync: bool = typer.Option(False, "--no-sync", help="Run the code already on the workers."),
    include_dirty: bool = typer.Option(False, "--include-dirty", help="Ship a snapshot of uncommitted changes."),
    env_file: Optional[str] = typer.Option(None, "--env-file", help="Env file on the target (default: /root/.env if pushed; local: ./.env)."),
    follow_logs: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the job ends; exit with its code."),
    local: bool = LocalOpt,
    force: bool = typer.Option(False, "--force", help="Stop a job still running there first."),
) -> None:
    """Start `python -m mllm_jax train RECIPE` detached on the workers (one process each)."""
    from pathlib import Path

    from launcher import jobs, ssh

    targets, v = _targets(local, vm, zone, project, internal_ip, worker, user)
    if local:
        if not Path(config).is_file():
            raise LauncherError(f"--config {config}: file not found")
        sha = _git_head_or_none() or "nogit"
        config_arg = config
    else:
        root = _repo_root()
        path = Path(config).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            raise LauncherError(f"--config {config}: expected a file inside the repository {root} (it is synced)")
        config_arg = str(path.relative_to(root))
    with (v.conns if v else contextlib.nullcontext()):
        if not local:
            sha = _sync(v, [t.worker for t in targets], "HEAD", include_dirty) if not no_sync else "nosync"
        busy = sorted({r for t in targets for r in jobs.running_jobs(t)})
        if busy and not force:
            raise LauncherError(f"a job is still running there ({', '.join(busy)}): `mllm stop` it or pass --force")
        for run in busy:
            for t in targets:
                ssh.emit(t.label, f"stopping {run}: {jobs.stop(t, run)}")
        if env_file is None and not local:
            env_file = "/root/.env" if targets[0].sh("test -f /root/.env")[0] == 0 else None
        for t in targets:
            code, out = t.sh(f"cd {t.repo} && {t.python} -c 'import jax, mllm_jax'")
            if code:
                raise LauncherError(f"{t.label}: cannot import jax and mllm_jax there ({out.strip()[-200:]}); run `mllm bootstrap`")
        run_id = jobs.new_run_id(recipe, sha)
        coordinator = f"{v.internal_ips[targets[0].index]}:{jobs.COORDINATOR_PORT}" if v else None
        spec = jobs.LaunchSpec(recipe, config_arg, list(overrides), run_id, env_file, coordinator, len(targets))
        started: list[jobs.Target] = []
        try:
            for process_id, t in enumerate(targets):
                jobs.start(t, spec, process_id)
                started.append(t)
                ssh.emit(t.label, f"started {run_id} (process {process_id} of {len(targets)})")
        except LauncherError:  # nothing half-started: the others would wait for the missing one forever
            for t in started:
                ssh.emit(t.label, f"stopping {run_id}: {jobs.stop(t, run_id, grace=5)}")
            raise
        typer.echo(f"run {run_id}: follow with `mllm logs -f{' --local' if local else ''}`, "
                   f"results with `mllm fetch-summary{' --local' if local else ''}`")
        if follow_logs:
            _stream_all(targets, run_id, until_exit=True)
            codes = [jobs.exit_code(t, run_id) for t in targets]
            raise typer.Exit(max((c if c is not None else 1) for c in codes))


def _git_head_or_none() -> Optional[str]:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@app.command("status")
def status_cmd(run: Optional[str] = RunArg, local: bool = LocalOpt, vm: Optional[str] = VmOpt,
               zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt, worker: str = WorkerOpt,
               internal_ip: bool = InternalOpt, user: str = UserOpt,
               as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Per worker: running / exited N / lost, last step and last log line."""
    from dataclasses import asdict

    from launcher import jobs, ssh

    with _run_on(run, local, vm, zone, project, internal_ip, worker, user) as (targets, _, run_id):
        found = ssh.fan_out(targets, lambda t: jobs.status(t, run_id))
    if as_json:
        typer.echo(json.dumps({"run": run_id, "workers": [asdict(s) for s in found.values()]}, indent=2))
        return
    typer.echo(f"run {run_id}")
    for s in found.values():
        typer.echo(f"[w{s.worker}] {s.state:10s} step {s.last_step if s.last_step is not None else '-'}  {s.last_line}")


@app.command("logs")
def logs_cmd(run: Optional[str] = RunArg, local: bool = LocalOpt, vm: Optional[str] = VmOpt,
             zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt, worker: str = WorkerOpt,
             internal_ip: bool = InternalOpt, user: str = UserOpt,
             follow_logs: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")) -> None:
    """Print the run's logs, `[wK]`-prefixed; -f follows them until the job ends."""
    import shlex

    with _run_on(run, local, vm, zone, project, internal_ip, worker, user) as (targets, _, run_id):
        if follow_logs:
            _stream_all(targets, run_id, until_exit=True)
        else:
            for t in targets:
                code, out = t.sh(f"cat {t.repo}/runs/{shlex.quote(run_id)}/logs/worker-{t.index}.log")
                if code:
                    raise LauncherError(f"{t.label}: no log for run {run_id}")
                for line in out.splitlines():
                    typer.echo(f"[{t.label}] {line}")


@app.command("stop")
def stop_cmd(run: Optional[str] = RunArg, local: bool = LocalOpt, vm: Optional[str] = VmOpt,
             zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt, worker: str = WorkerOpt,
             internal_ip: bool = InternalOpt, user: str = UserOpt,
             grace: float = typer.Option(60.0, "--grace", help="Seconds between TERM (checkpoint) and KILL.")) -> None:
    """Stop the run on every worker: TERM (the trainer checkpoints), then KILL after --grace."""
    from launcher import jobs, ssh

    with _run_on(run, local, vm, zone, project, internal_ip, worker, user) as (targets, _, run_id):
        done = ssh.fan_out(targets, lambda t: jobs.stop(t, run_id, grace))
    for t in targets:
        ssh.emit(t.label, f"{run_id}: {done[t.index]}")


@app.command("fetch-summary")
def fetch_summary_cmd(run: Optional[str] = RunArg, dest: str = typer.Option("runs", "--dest", help="Local folder."),
                      local: bool = LocalOpt, vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt,
                      project: Optional[str] = ProjectOpt, internal_ip: bool = InternalOpt, user: str = UserOpt) -> None:
    """Copy run_summary.json, the resolved config and metrics.jsonl home; index the run."""
    from pathlib import Path

    from launcher import runs

    with _run_on(run, local, vm, zone, project, internal_ip, "0", user) as (targets, v, run_id):
        summary = (runs.fetch(targets[0], run_id, Path(dest)) if not local
                   else json.loads((Path("runs") / run_id / "run_summary.json").read_text()))
    entry = runs.record(run_id, summary, v.name if v else None, v.zone if v else None,
                        Path(dest) if not local else Path("runs"))
    typer.echo(f"{run_id}: {summary.get('status')} at step {summary.get('final_step')}, "
               f"final train loss {summary.get('final_train_loss')}, eval loss {entry['eval_loss']} "
               f"(best {entry['best_eval_loss']}), commit {str(entry['commit'])[:12]}, "
               f"{summary.get('process_count')} process(es)")
    w = summary.get("wandb") or {}
    if w.get("url"):
        typer.echo(f"W&B: {w['url']}")
    elif w.get("sync_command"):
        typer.echo(f"W&B offline run: {w['dir']} (upload with `{w['sync_command']}`)")
    typer.echo(f"saved to {entry['dest']}")


@app.command("runs")
def runs_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The local index of fetched runs."""
    from launcher import runs

    index = list(runs.load_index().values())
    if as_json:
        typer.echo(json.dumps(index, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "vm", "recipe", "commit", "status", "eval/loss", "W&B")
    for e in index:
        loss = f"{e['eval_loss']:.4f}" if e["eval_loss"] is not None else "-"
        table.add_row(e["run"], e["vm"], str(e["recipe"]), str(e["commit"])[:10], str(e["status"]), loss, e["wandb"] or "")
    Console().print(table)
