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
from mllm_jax import __version__, contracts

if TYPE_CHECKING:  # imported lazily at run time: `mllm --help` stays fast
    from launcher import cloud, ssh

# rich_markup_mode=None: help texts render literally (`[wK]` is not markup).
app = typer.Typer(help="Train LLMs with JAX, locally or on Cloud TPU VMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


vm_app = typer.Typer(help="Create, list, describe and delete TPU VMs (Cloud TPU API).", no_args_is_help=True,
                     rich_markup_mode=None)
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
             add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train in this process, exactly as `python -m mllm_jax train` on a VM (same arguments:
    RECIPE --config ... --set ... --resume ...; `mllm train --help` lists them)."""
    from mllm_jax.train import main as trainer_main

    raise typer.Exit(trainer_main(["train", *ctx.args]))


VmOpt = typer.Option(None, "--vm", help="TPU VM name (default: the last one used, or $MLLM_VM).")
ZoneOpt = typer.Option(None, "--zone", help="Zone, e.g. us-east1-d (default: last used, or $MLLM_ZONE).")
ProjectOpt = typer.Option(None, "--project", help="GCP project (default: $MLLM_PROJECT, $CLOUDSDK_CORE_PROJECT, ADC).")
TimeoutOpt = typer.Option(900.0, "--timeout", help="Seconds to wait for the operation.")


def _zone(zone: Optional[str], project: Optional[str]) -> "cloud.Zone":
    from launcher import cloud

    zone = cloud.check_zone(state.resolve("zone", zone, "--zone"))
    project = cloud.resolve_project(state.resolve("project", project, "--project", required=False))
    return cloud.Zone(project, zone, cloud.make_client())


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _vm_name(name: Optional[str], vm: Optional[str]) -> str:
    """NAME as an argument (gcloud's habit) or --vm; else the remembered VM."""
    from launcher import cloud

    if name and vm and name != vm:
        raise LauncherError(f"NAME {name!r} and --vm {vm!r} differ: give one")
    return cloud.check_name(state.resolve("vm", name or vm, "--vm"))


NameArg = typer.Argument(None, help="TPU VM name (or --vm; default: the last one used, or $MLLM_VM).")
DryRunOpt = typer.Option(False, "--dry-run", help="Print the API requests it would send, and send none.")


@vm_app.command("create")
def vm_create(
    name: Optional[str] = typer.Argument(None, help="VM name (default mllm-<type>-<yymmddHHMMSS>)."),
    zone: Optional[str] = ZoneOpt,
    project: Optional[str] = ProjectOpt,
    accelerator_type: str = typer.Option("v6e-8", "--type", help="Accelerator type, e.g. v6e-8, v5litepod-16."),
    version: str = typer.Option("auto", "--version", help="Runtime version; auto picks the generation's default."),
    spot: bool = typer.Option(True, "--spot/--on-demand", help="Spot capacity (default) or on-demand."),
    queued: bool = typer.Option(False, "--queued", help="Ask through a queued resource and wait in its queue (how v6e/v5e spot capacity usually comes)."),
    guaranteed: bool = typer.Option(False, "--guaranteed", help="With --queued: guaranteed (on-demand) capacity instead of spot."),
    reserved: Optional[str] = typer.Option(None, "--reserved", metavar="RESERVATION", help="With --queued: capacity from this reservation (name or full path)."),
    valid_for: Optional[str] = typer.Option(None, "--valid-for", metavar="DURATION", help="With --queued: give up queueing after this long, e.g. 6h."),
    no_wait: bool = typer.Option(False, "--async", help="Return once the request is accepted."),
    dry_run: bool = DryRunOpt,
    timeout: float = TimeoutOpt,
    poll: float = typer.Option(10.0, "--poll", help="With --queued: seconds between looks at the queue."),
) -> None:
    """Create a TPU VM whose workers accept the launcher's SSH key as root."""
    from launcher import cloud, keys

    cloud.check_type(accelerator_type)
    if not queued and (guaranteed or reserved or valid_for):
        raise LauncherError("--guaranteed, --reserved and --valid-for need --queued")
    name = cloud.check_name(name or f"mllm-{accelerator_type}-{time.strftime('%y%m%d%H%M%S', time.gmtime())}")
    version = cloud.runtime_version(accelerator_type, version)
    capacity = "reserved" if reserved else "guaranteed" if guaranteed or not spot else "spot"
    window = cloud.parse_duration(valid_for, "--valid-for") if valid_for else None
    z = _zone(zone, project)
    public_key = keys.public_key() if dry_run else keys.ensure_key()[1]
    node = z.node_spec(accelerator_type, version, capacity == "spot" and not queued, public_key)
    qr = z.queued_spec(name, node, capacity, reserved, window) if queued else None
    if dry_run:
        typer.echo((z.create_queued_request(name, qr) if qr else z.create_request(name, node)).text())
        return
    if qr is not None:
        z.create_queued(name, qr)
        state.remember(vm=name, zone=z.zone, project=z.project)
        if no_wait:
            typer.echo(f"queued {name} ({accelerator_type}, {capacity}) in {z.zone}; watch it with `mllm vm list`")
            return
        try:
            created = cloud.wait_queued(z, name, timeout, poll)
        except KeyboardInterrupt:
            typer.echo(f"stopped waiting; {name} stays queued (remove it with `mllm vm delete {name}`)", err=True)
            raise typer.Exit(130)
    else:
        created = z.create(name, node, timeout, wait=not no_wait)
        state.remember(vm=name, zone=z.zone, project=z.project)
    if created is None:
        typer.echo(f"requested {name} ({accelerator_type}) in {z.zone}; see `mllm vm describe {name}`")
    else:
        typer.echo(f"created {name} ({accelerator_type}, {version}, {capacity}) in {z.zone}: {created.state.name}, "
                   f"workers {', '.join(cloud.worker_ips(created))}")


@vm_app.command("list")
def vm_list(zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
            all_zones: bool = typer.Option(False, "--all-zones", help="Every zone that offers TPUs to the project."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the TPU VMs and queued resources in a zone (or in all zones)."""
    from launcher import cloud

    now = time.time()
    if all_zones:
        proj = cloud.resolve_project(state.resolve("project", project, "--project", required=False))
        rows = cloud.vm_rows_all_zones(proj, cloud.make_client(), now)
    else:
        rows = cloud.vm_rows(_zone(zone, project), now)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "zone", "type", "state", "health", "workers", "IPs", "spot", "queued", "age")
    for r in rows:
        queued = r["queued"] or "-"
        table.add_row(r["name"], r["zone"], r["type"], r["state"], r["health"], str(r["workers"]),
                      " ".join(r["ips"]), "yes" if r["spot"] else "no", queued, _age(r["age_sec"]))
    Console().print(table)


@vm_app.command("describe")
def vm_describe(name: Optional[str] = NameArg, vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt,
                project: Optional[str] = ProjectOpt) -> None:
    """Print one TPU VM (and its queued resource) as JSON."""
    from launcher import cloud

    z = _zone(zone, project)
    name = _vm_name(name, vm)
    rows = [r for r in cloud.vm_rows(z, time.time()) if name in (r["name"], r["queued_resource"])]
    if not rows:
        raise LauncherError(f"TPU VM {name} in {z.zone}: not found (no node or queued resource of that name)")
    state.remember(vm=name, zone=z.zone, project=z.project)
    typer.echo(json.dumps(rows[0], indent=2))


@vm_app.command("delete")
def vm_delete(
    name: Optional[str] = NameArg,
    vm: Optional[str] = VmOpt,
    zone: Optional[str] = ZoneOpt,
    project: Optional[str] = ProjectOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    stale: bool = typer.Option(False, "--stale", help="Delete every FAILED/SUSPENDED queued resource and PREEMPTED VM in the zone."),
    dry_run: bool = DryRunOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Delete a TPU VM and its queued resource (or, with --stale, everything dead in the zone)."""
    from launcher import cloud

    z = _zone(zone, project)
    if stale:
        if name or vm:
            raise LauncherError("--stale deletes every dead VM in the zone; give no NAME with it")
        plan = cloud.stale(z)
        if not plan:
            typer.echo(f"nothing stale in {z.zone}: no FAILED/SUSPENDED queued resources, no PREEMPTED VMs")
            return
    else:
        plan = [cloud.deletion(z, _vm_name(name, vm))]
    if dry_run:
        for d in plan:
            typer.echo(d.request.text())
        return
    if not yes and not typer.confirm(f"Delete {', '.join(d.what for d in plan)} in {z.zone}?"):
        raise typer.Exit(1)
    for d in plan:
        d.run(timeout)
        typer.echo(f"deleted {d.what}")


env_app = typer.Typer(help="Secrets for the workers (.env files).", no_args_is_help=True, rich_markup_mode=None)
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
    venv: str = typer.Option(contracts.DEFAULT_VENV, "--venv", help="Virtualenv to create on each worker."),
    python: Optional[str] = typer.Option(None, "--python", help="Use this existing interpreter instead of a venv."),
    jax_version: Optional[str] = typer.Option(None, "--jax-version", help="jax/jaxlib (and libtpu) at this version instead of the laptop's."),
    python_version: Optional[str] = typer.Option(None, "--python-version", help="The venv's Python, e.g. 3.12 (default: the laptop's); uv downloads it if missing."),
    find_links: list[str] = typer.Option([], "--find-links", metavar="DIR", help="A wheel directory on the workers, looked at first (repeatable)."),
    offline: bool = typer.Option(False, "--offline", help="Install only from uv's cache and --find-links on the workers."),
    index_url: Optional[str] = typer.Option(None, "--index-url", help="Package index instead of PyPI."),
    no_sync: bool = typer.Option(False, "--no-sync", help="Install from the repo already on the workers."),
    include_dirty: bool = typer.Option(False, "--include-dirty", help="Ship a snapshot of uncommitted changes."),
) -> None:
    """Sync the repo, then install its pyproject.toml into a venv on each worker (uv, no pip or
    ensurepip needed; pinned to this laptop's versions); a no-op in seconds when nothing changed."""
    from launcher import remote, ssh

    options = remote.InstallOptions(venv, jax_version, python_version, list(find_links), offline, index_url)
    v = _vm(vm, zone, project, internal_ip, user)
    workers = ssh.select_workers(v.workers, worker)
    with v.conns:
        if not python and not no_sync:
            _sync(v, workers, "HEAD", include_dirty)
        results = ssh.fan_out(workers, lambda w: remote.bootstrap(v.conns, w, options, python))
    for i, r in results.items():
        ssh.emit(f"w{i}", f"ready: {r['python']} ({_bootstrap_words(r)})")


def _bootstrap_words(r: dict) -> str:
    if r["state"] == "installed":
        return f"installed in {r['seconds']:.1f}s: {r['reason']}"
    if r["state"] == "up-to-date":
        return f"up to date, checked in {r['seconds']:.1f}s"
    return "existing interpreter"


@app.command("versions")
def versions_cmd(
    vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt,
    worker: str = WorkerOpt, internal_ip: bool = InternalOpt, user: str = UserOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Python, JAX stack, backend, devices, OS and kernel of this laptop and each worker; a `*`
    marks what differs from the laptop."""
    from launcher import remote, ssh

    workers, conns = _workers(vm, zone, project, internal_ip, worker, user)
    with conns:
        found = ssh.fan_out(workers, lambda w: remote.versions(conns, w))
    laptop = remote.laptop_versions()
    diff = remote.mismatches(laptop, found)
    if as_json:
        typer.echo(json.dumps({"laptop": laptop, "workers": {str(i): v for i, v in found.items()},
                               "mismatches": [{"worker": i, "field": f, "laptop": laptop.get(f),
                                               "worker_value": found[i].get(f)} for i, f in diff]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    cols = ["python", *remote.VERSION_PACKAGES, "backend", "device_count", "os", "kernel"]
    table = Table("machine", *cols)
    table.add_row("laptop", *[str(laptop.get(c, "")) for c in cols])
    for i, v in found.items():
        table.add_row(f"w{i}", *[f"{v.get(c)}{' *' if (i, c) in diff else ''}" for c in cols])
    Console().print(table)
    if diff:
        typer.echo("* differs from the laptop: " + ", ".join(f"w{i} {f} {found[i].get(f)} (laptop {laptop.get(f)})"
                                                               for i, f in diff) + "; `mllm bootstrap` aligns them")


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
        if not local:
            from launcher import remote

            ssh.fan_out([t.worker for t in targets], lambda w: remote.refresh(v.conns, w))
        jax_versions = ssh.fan_out(targets, _importable_jax)
        first = targets[0]
        for t in targets[1:]:
            if jax_versions[t.index] != jax_versions[first.index]:
                raise LauncherError(f"{t.label} has jax {jax_versions[t.index]} but {first.label} has "
                                    f"{jax_versions[first.index]}: mixed versions hang jax.distributed; run `mllm bootstrap`")
        run_id = contracts.run_id(recipe, sha)
        coordinator = f"{v.internal_ips[targets[0].index]}:{contracts.COORDINATOR_PORT}" if v else None
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


def _importable_jax(t: "jobs.Target") -> str:  # noqa: F821
    """The jax version the target's interpreter has, once it imports jax and mllm_jax from the repo."""
    code, out = t.sh(f"cd {t.repo} && {t.python} -c 'import importlib.metadata as m; "
                     f"print(\"MLLM_JAX\", m.version(\"jax\"), flush=True); import jax, mllm_jax'")
    found = [line.split()[1] for line in out.splitlines() if line.startswith("MLLM_JAX ")]
    if code:
        raise LauncherError(f"{t.label}: cannot import jax and mllm_jax there ({out.strip()[-200:]}); run `mllm bootstrap`")
    return found[0]


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
                code, out = t.sh(f"cat {t.repo}/{contracts.RUNS_DIR}/{shlex.quote(run_id)}/{contracts.worker_log(t.index)}")
                if code:
                    raise LauncherError(f"{t.label}: no log for run {run_id}")
                for line in out.splitlines():
                    typer.echo(f"[{t.label}] {line}")


@app.command("stop")
def stop_cmd(run: Optional[str] = RunArg, local: bool = LocalOpt, vm: Optional[str] = VmOpt,
             zone: Optional[str] = ZoneOpt, project: Optional[str] = ProjectOpt, worker: str = WorkerOpt,
             internal_ip: bool = InternalOpt, user: str = UserOpt,
             grace: float = typer.Option(contracts.STOP_GRACE_SEC, "--grace", help="Seconds between TERM (checkpoint) and KILL.")) -> None:
    """Stop the run on every worker: TERM (the trainer checkpoints), then KILL after --grace."""
    from launcher import jobs, ssh

    with _run_on(run, local, vm, zone, project, internal_ip, worker, user) as (targets, _, run_id):
        done = ssh.fan_out(targets, lambda t: jobs.stop(t, run_id, grace))
    for t in targets:
        ssh.emit(t.label, f"{run_id}: {done[t.index]}")


@app.command("fetch-summary")
def fetch_summary_cmd(run: Optional[str] = RunArg, dest: str = typer.Option(contracts.RUNS_DIR, "--dest", help="Local folder."),
                      local: bool = LocalOpt, vm: Optional[str] = VmOpt, zone: Optional[str] = ZoneOpt,
                      project: Optional[str] = ProjectOpt, internal_ip: bool = InternalOpt, user: str = UserOpt) -> None:
    """Copy run_summary.json, the resolved config and metrics.jsonl home; index the run."""
    from pathlib import Path

    from launcher import runs

    with _run_on(run, local, vm, zone, project, internal_ip, "0", user) as (targets, v, run_id):
        summary = (runs.fetch(targets[0], run_id, Path(dest)) if not local
                   else json.loads((Path(contracts.RUNS_DIR) / run_id / contracts.SUMMARY_FILE).read_text()))
    entry = runs.record(run_id, summary, v.name if v else None, v.zone if v else None,
                        Path(dest) if not local else Path(contracts.RUNS_DIR))
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
