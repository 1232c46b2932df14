"""The `mllm` command: thin Typer commands; the work lives in plain functions elsewhere."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from launcher import state
from launcher.errors import Interrupted, LauncherError
from mllm_jax import __version__, contracts

if TYPE_CHECKING:  # imported lazily at run time: `mllm --help` stays fast
    from launcher import cluster

# rich_markup_mode=None: help texts render literally (`[wK]` is not markup).
app = typer.Typer(help="Train LLMs with JAX, locally or on Cloud TPU VMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


vm_app = typer.Typer(help="Create, list, describe and delete TPU VMs (Cloud TPU API).", no_args_is_help=True,
                     rich_markup_mode=None)
app.add_typer(vm_app, name="vm")


def run() -> None:
    """Console entry point: launcher errors are one line on stderr and exit code 2."""
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except LauncherError as e:
        from launcher.readback import printable

        print(f"error: {printable(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Interrupted:
        print("interrupted: stopped here and on the workers (a job already launched goes on: `mllm status`)",
              file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


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


# Options shared by several commands, declared once (Typer reads the Annotated aliases).
Vm = Annotated[Optional[str], typer.Option("--vm", help="TPU VM name (default: the last one used, or $MLLM_VM).")]
Zone = Annotated[Optional[str], typer.Option("--zone", help="Zone, e.g. us-east1-d (default: last used, or $MLLM_ZONE).")]
Project = Annotated[Optional[str], typer.Option("--project", help="GCP project (default: $MLLM_PROJECT, $CLOUDSDK_CORE_PROJECT, ADC).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the operation.")]
Name = Annotated[Optional[str], typer.Argument(help="TPU VM name (or --vm; default: the last one used, or $MLLM_VM).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the API requests it would send, and send none.")]
Workers = Annotated[str, typer.Option("--worker", "-w", help="Workers: all, an index (0) or a list (1,3).")]
InternalIp = Annotated[bool, typer.Option("--internal-ip", help="Connect to the workers' internal IPs.")]
User = Annotated[Optional[str], typer.Option("--user", help="SSH user on the workers (default: root).")]
SshProxy = Annotated[Optional[str], typer.Option("--ssh-proxy", metavar="COMMAND", help="Reach the workers through "
                     "this ProxyCommand, e.g. 'ssh -W %h:%p bastion' (remembered; 'none' connects directly).")]
Local = Annotated[bool, typer.Option("--local", help="This machine instead of a TPU VM (runs under ./runs).")]
RunId = Annotated[Optional[str], typer.Argument(help="Run id (default: the target's runs/latest).")]
IncludeDirty = Annotated[bool, typer.Option("--include-dirty", help="Ship a snapshot of uncommitted changes.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AllowRestart = Annotated[bool, typer.Option("--allow-restart-from-zero", help="Supervise a run whose checkpoints are "
                         "on the VM's own disk: a recovery then trains from step 0 again.")]
KeepVm = Annotated[Optional[bool], typer.Option("--keep-vm/--delete-vm", help="When the run ends: keep the VM, or "
                   "delete it and its queued resource (default: delete it only if mllm created it).")]


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


@vm_app.command("create")
def vm_create(
    name: Optional[str] = typer.Argument(None, help="VM name (default mllm-<type>-<yymmddHHMMSS>)."),
    zone: Zone = None,
    project: Project = None,
    accelerator_type: str = typer.Option("v6e-8", "--type", help="Accelerator type, e.g. v6e-8, v5litepod-16."),
    version: str = typer.Option("auto", "--version", help="Runtime version; auto picks the generation's default."),
    spot: bool = typer.Option(True, "--spot/--on-demand", help="Spot capacity (default) or on-demand."),
    queued: bool = typer.Option(False, "--queued", help="Ask through a queued resource and wait in its queue (how v6e/v5e spot capacity usually comes)."),
    guaranteed: bool = typer.Option(False, "--guaranteed", help="With --queued: guaranteed (on-demand) capacity instead of spot."),
    reserved: Optional[str] = typer.Option(None, "--reserved", metavar="RESERVATION", help="With --queued: capacity from this reservation (name or full path)."),
    valid_for: Optional[str] = typer.Option(None, "--valid-for", metavar="DURATION", help="With --queued: give up queueing after this long, e.g. 6h."),
    no_wait: bool = typer.Option(False, "--async", help="Return once the request is accepted."),
    dry_run: DryRun = False,
    timeout: Timeout = 900.0,
    poll: float = typer.Option(10.0, "--poll", help="With --queued: seconds between looks at the queue."),
    network: Optional[str] = typer.Option(None, "--network", help="VPC network (default: the project's `default`)."),
    subnetwork: Optional[str] = typer.Option(None, "--subnetwork", help="Subnetwork of --network."),
    external_ip: bool = typer.Option(True, "--external-ip/--no-external-ip", help="External IPs for the workers "
                                     "(without: reach them by internal IP, e.g. through --ssh-proxy)."),
    tags: list[str] = typer.Option([], "--tag", help="Network tag for firewall rules (repeatable)."),
    service_account: Optional[str] = typer.Option(None, "--service-account", metavar="EMAIL",
                                                  help="Service account the VM runs as (it writes --bucket checkpoints)."),
    scopes: list[str] = typer.Option([], "--scopes", help="OAuth scopes of --service-account, comma-separated or "
                                                          "repeated (default: cloud-platform)."),
    os_login: bool = typer.Option(False, "--os-login", help="Log in as your OS Login user (key imported through the "
                                                            "OS Login API) instead of root with a metadata key."),
) -> None:
    """Create a TPU VM whose workers accept the launcher's SSH key as root (OS Login off for this
    VM), or your OS Login user with --os-login."""
    from launcher import cloud, keys

    if not 0 < timeout < float("inf"):
        raise LauncherError(f"--timeout {timeout:g}: expected seconds > 0")
    if not 0 < poll < float("inf"):
        raise LauncherError(f"--poll {poll:g}: expected seconds > 0")
    net = cloud.Network.checked(network, subnetwork, external_ip, tags, service_account,
                                [x for s in scopes for x in s.split(",") if x])
    req = cloud.VmRequest.checked(name, accelerator_type, version, spot, queued, guaranteed, reserved, valid_for,
                                  net, os_login)
    z = cloud.Zone.resolve(zone, project)
    if dry_run:
        typer.echo(z.create_vm_request(req, keys.public_key()).text())
        return
    try:
        created = z.create_vm(req, keys.ensure_key()[1], timeout, poll, wait=not no_wait,
                              on_accepted=lambda: (state.remember(vm=req.name, zone=z.zone, project=z.project),
                                                   state.mark_created(z.project, z.zone, req.name)))
    except Interrupted:
        typer.echo(f"stopped waiting; {req.name} stays queued (remove it with `mllm vm delete {req.name}`)", err=True)
        raise typer.Exit(130)
    typer.echo(req.describe(z.zone, created))


@vm_app.command("list")
def vm_list(zone: Zone = None, project: Project = None,
            all_zones: bool = typer.Option(False, "--all-zones", help="Every zone that offers TPUs to the project."),
            as_json: AsJson = False) -> None:
    """List the TPU VMs and queued resources in a zone (or in all zones)."""
    from launcher import cloud

    now = time.time()
    if all_zones:
        proj = cloud.resolve_project(state.resolve("project", project, "--project", required=False))
        rows = cloud.vm_rows_all_zones(proj, cloud.make_client(), now)
    else:
        rows = cloud.vm_rows(cloud.Zone.resolve(zone, project), now)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console

    Console().print(_vm_table(rows))


def _vm_table(rows: list[dict]) -> "Table":  # noqa: F821
    from rich.table import Table

    table = Table("name", "zone", "type", "state", "health", "workers", "IPs", "spot", "queued", "age")
    for r in rows:
        table.add_row(r["name"], r["zone"], r["type"], r["state"], r["health"], str(r["workers"]),
                      " ".join(r["ips"]), "yes" if r["spot"] else "no", r["queued"] or "-", _age(r["age_sec"]))
    return table


@vm_app.command("describe")
def vm_describe(name: Name = None, vm: Vm = None, zone: Zone = None,
                project: Project = None) -> None:
    """Print one TPU VM (and its queued resource) as JSON."""
    from launcher import cloud

    z = cloud.Zone.resolve(zone, project)
    name = _vm_name(name, vm)
    rows = [r for r in cloud.vm_rows(z, time.time()) if name in (r["name"], r["queued_resource"])]
    if not rows:
        raise LauncherError(f"TPU VM {name} in {z.zone}: not found (no node or queued resource of that name)")
    state.remember(vm=name, zone=z.zone, project=z.project)
    typer.echo(json.dumps(rows[0], indent=2))


@vm_app.command("delete")
def vm_delete(
    name: Name = None,
    vm: Vm = None,
    zone: Zone = None,
    project: Project = None,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    stale: bool = typer.Option(False, "--stale", help="Delete every FAILED/SUSPENDED queued resource and PREEMPTED VM in the zone."),
    dry_run: DryRun = False,
    timeout: Timeout = 900.0,
) -> None:
    """Delete a TPU VM and its queued resource (or, with --stale, everything dead in the zone)."""
    from launcher import cloud

    z = cloud.Zone.resolve(zone, project)
    if stale and (name or vm):
        raise LauncherError("--stale deletes every dead VM in the zone; give no NAME with it")
    plan = cloud.stale(z) if stale else [cloud.deletion(z, _vm_name(name, vm))]
    if not plan:
        typer.echo(f"nothing stale in {z.zone}: no FAILED/SUSPENDED queued resources, no PREEMPTED VMs")
    elif dry_run:
        typer.echo("\n".join(d.request.text() for d in plan))
    elif yes or typer.confirm(f"Delete {', '.join(d.what for d in plan)} in {z.zone}?"):
        for d in plan:
            d.run(timeout)
            typer.echo(f"deleted {d.what}")
    else:
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    zone: Zone = None,
    project: Project = None,
    accelerator_type: str = typer.Option("v6e-8", "--type", help="Accelerator type you mean to create, e.g. v6e-8."),
    version: str = typer.Option("auto", "--version", help="Runtime version you mean to create with; auto: the type's default."),
    bucket: Optional[str] = typer.Option(None, "--bucket", metavar="gs://BUCKET[/PREFIX]",
                                         help="Check that you can write there (default: $MLLM_BUCKET, else the last one used)."),
) -> None:
    """Check what a launch needs, one line each (credentials, project, Cloud TPU API, type and
    runtime in the zone, OS Login, SSH key, bucket, W&B key); exit 1 if anything would stop it."""
    from launcher import doctor

    checks = doctor.run_checks(zone, project, accelerator_type, version, bucket)
    for check in checks:
        typer.echo(check.line())
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


env_app = typer.Typer(help="Secrets for the workers (.env files).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(env_app, name="env")

def _cluster(vm: Optional[str], zone: Optional[str], project: Optional[str], worker: str = "all",
             internal_ip: bool = False, user: Optional[str] = None, local: bool = False,
             ssh_proxy: Optional[str] = None) -> "cluster.Cluster":
    from launcher.cluster import Cluster

    return Cluster.local() if local else Cluster.connect(vm, zone, project, worker, internal_ip, user, ssh_proxy)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    ctx: typer.Context, vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
    internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
    env_file: Optional[str] = typer.Option(None, "--env-file", help="Source this pushed env file on the worker first."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop the other workers once one fails."),
) -> None:
    """Run a command on workers in parallel: mllm exec --worker all -- CMD ARGS..."""
    if not ctx.args:
        raise LauncherError("no command given: mllm exec [options] -- CMD ARGS...")
    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        raise typer.Exit(c.exec(list(ctx.args), env_file, fail_fast))


@app.command("ssh")
def ssh_cmd(vm: Vm = None, zone: Zone = None, project: Project = None,
            worker: str = typer.Option("0", "--worker", "-w", help="Worker index."),
            internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None) -> None:
    """Interactive shell on one worker (the system ssh, with the launcher's key and verified host key)."""
    import os

    from launcher import keys

    if worker == "all" or "," in worker:
        raise LauncherError("--worker: mllm ssh opens one shell; give one index")
    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        (w,) = c.selected
        c.conns.client(w)  # verifies the host key (published or first use) before handing over
    os.execvp("ssh", keys.ssh_argv(w, c.conns.user, c.conns.proxy))


@env_app.command("push")
def env_push(
    src: str = typer.Option(".env", "--src", help="Local env file (KEY=VALUE lines)."),
    dest: str = typer.Option(contracts.ENV_ON_WORKER, "--dest", help="Path of the env file on the workers (~ = the login user's home)."),
    vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
    internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
) -> None:
    """Copy an env file to the workers over SFTP (mode 0600); prints key names only."""
    from pathlib import Path

    from launcher import remote, ssh

    remote.normalized_env(Path(src))  # a missing or empty file is an error before connecting
    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        names = c.push_env(Path(src), dest)
        dest = c.worker_path(dest)
    for w in c.selected:
        ssh.emit(w.label, f"{dest} (0600): {', '.join(names)}")


@app.command("bootstrap")
def bootstrap_cmd(
    vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
    internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
    venv: str = typer.Option(contracts.DEFAULT_VENV, "--venv", help="Virtualenv to create on each worker."),
    python: Optional[str] = typer.Option(None, "--python", help="Use this existing interpreter instead of a venv."),
    jax_version: Optional[str] = typer.Option(None, "--jax-version", help="jax/jaxlib (and libtpu) at this version instead of the laptop's."),
    python_version: Optional[str] = typer.Option(None, "--python-version", help="The venv's Python, e.g. 3.12 (default: the laptop's); uv downloads it if missing."),
    find_links: list[str] = typer.Option([], "--find-links", metavar="DIR", help="A wheel directory on the workers, looked at first (repeatable)."),
    offline: bool = typer.Option(False, "--offline", help="Install only from uv's cache and --find-links on the workers."),
    index_url: Optional[str] = typer.Option(None, "--index-url", help="Package index instead of PyPI."),
    no_sync: bool = typer.Option(False, "--no-sync", help="Install from the repo already on the workers."),
    include_dirty: IncludeDirty = False,
) -> None:
    """Sync the repo, then install its pyproject.toml into a venv on each worker (uv, no pip or
    ensurepip needed; pinned to this laptop's versions); a no-op in seconds when nothing changed."""
    from launcher import remote

    options = remote.InstallOptions(venv, jax_version, python_version, list(find_links), offline, index_url)
    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        c.bootstrap(options, python, sync_first=not no_sync, include_dirty=include_dirty)


@app.command("versions")
def versions_cmd(vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
                 internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None, as_json: AsJson = False) -> None:
    """Python, JAX stack, backend, devices, OS and kernel of this laptop and each worker; a `*`
    marks what differs from the laptop."""
    from launcher import remote

    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        laptop, found, diff = c.versions()
    if as_json:
        typer.echo(json.dumps(remote.versions_json(laptop, found, diff), indent=2))
        return
    from rich.console import Console

    Console().print(remote.versions_table(laptop, found, diff))
    if diff:
        typer.echo("* differs from the laptop: " + ", ".join(f"w{i} {f} {found[i].get(f)} (laptop {laptop.get(f)})"
                                                               for i, f in diff) + "; `mllm bootstrap` aligns them")


@app.command("sync")
def sync_cmd(
    vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
    internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
    ref: str = typer.Option("HEAD", "--ref", help="Commit, branch or tag to ship."), include_dirty: IncludeDirty = False,
) -> None:
    """Make ~/mllm-jax on every worker hold exactly the local commit (over SSH, no GitHub needed)."""
    with _cluster(vm, zone, project, worker, internal_ip, user, ssh_proxy=ssh_proxy) as c:
        c.sync(ref, include_dirty)


@app.command("launch")
def launch_cmd(
    recipe: str = typer.Argument(..., help="Recipe, e.g. nanogpt."),
    config: str = typer.Option(..., "--config", help="YAML config (inside the repo: it travels with the sync)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key (repeatable)."),
    vm: Vm = None, zone: Zone = None, project: Project = None, worker: Workers = "all",
    internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
    no_sync: bool = typer.Option(False, "--no-sync", help="Run the code already on the workers."),
    include_dirty: IncludeDirty = False,
    env_file: Optional[str] = typer.Option(None, "--env-file", help="Env file on the target (default: ~/.env if pushed; local: ./.env)."),
    follow_logs: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the job ends; exit with its code."),
    local: Local = False,
    force: bool = typer.Option(False, "--force", help="Stop a job still running there first."),
    no_preflight: bool = typer.Option(False, "--no-preflight", envvar="MLLM_NO_PREFLIGHT",
                                      help="Do not compile the config for the VM's TPU type first (`mllm preflight`)."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN",
                                         help="Continue RUN (or `latest`) from its last checkpoint: same run id, "
                                              "W&B run and metrics.jsonl."),
    allow_config_change: list[str] = typer.Option(
        [], "--allow-config-change", metavar="KEY",
        help="With --resume: let KEY (a setting or section) differ from the checkpoint's although it changes the "
             "model, data or numerics (repeatable)."),
    bucket: Optional[str] = typer.Option(None, "--bucket", metavar="gs://BUCKET[/PREFIX]",
                                         help="Checkpoints in BUCKET/<run id>/checkpoints unless the config names "
                                              "train.checkpoint_dir (default: $MLLM_BUCKET, else the last one used)."),
    recover: bool = typer.Option(False, "--recover", help="Then supervise the run here like `mllm watch`: recreate a "
                                                          "preempted VM and resume (needs checkpoints on a bucket; timing from $MLLM_WATCH_*)."),
    max_recoveries: int = typer.Option(3, "--max-recoveries", min=0, help="With --recover: recoveries before giving up."),
    restart_on_failure: bool = typer.Option(False, "--restart-on-failure", help="With --recover: resume a job that "
                                                                                "exited non-zero by itself too."),
    keep_vm: KeepVm = None,
    allow_restart_from_zero: AllowRestart = False,
) -> None:
    """Start `python -m mllm_jax train RECIPE` detached on the workers (one process each); on a VM,
    after preflight says the config fits its chips."""
    if recover and local:
        raise LauncherError("--recover supervises a TPU VM; it does not apply to --local")
    if resume is not None and not resume.strip():
        raise LauncherError("--resume '': expected a run id or `latest` (an unset shell variable?)")
    if allow_config_change and resume is None:
        raise LauncherError("--allow-config-change: only with --resume (a new run has nothing to differ from)")
    if follow_logs:
        from launcher import ssh

        ssh.follow_idle_sec()  # a bad $MLLM_FOLLOW_IDLE_SEC is refused before the job starts
    if recover:
        from launcher import watch

        watch.Timing.resolve()  # a bad $MLLM_WATCH_* is refused before anything starts
    if not local:  # the remembered bucket is for VMs; a local run uses one only when given
        bucket = state.resolve("bucket", bucket, "--bucket", required=False)
    with _cluster(vm, zone, project, worker, internal_ip, user, local, ssh_proxy) as c:
        run = c.launch(recipe, config, list(overrides), env_file, not no_sync, include_dirty, force, not no_preflight,
                       resume, bucket, durable=recover and not allow_restart_from_zero,
                       allow_config_change=tuple(allow_config_change))
        if bucket:
            state.remember(bucket=bucket)
        where = " --local" if local else ""
        typer.echo(f"run {run.id}: follow with `mllm logs -f{where}`, results with `mllm fetch-summary{where}`")
        if follow_logs and not recover:
            raise typer.Exit(run.wait())
    if recover:
        raise typer.Exit(_watch(run.id, max_recoveries, restart_on_failure, keep_vm, None,
                                allow_restart_from_zero=allow_restart_from_zero or None))


def _watch(run_id: str, max_recoveries: Optional[int], restart_on_failure: Optional[bool], keep_vm: Optional[bool],
           push_env: Optional[str], poll: Optional[float] = None, unreachable_after: Optional[float] = None,
           backoff: Optional[float] = None, allow_restart_from_zero: Optional[bool] = None) -> int:
    """Update the run's watch plan with the options given, then supervise it here."""
    from pathlib import Path

    from launcher import watch

    timing = watch.Timing.resolve(poll=poll, unreachable_after=unreachable_after, backoff=backoff)
    plan = watch.load(run_id)
    for key, value in (("max_recoveries", max_recoveries), ("restart_on_failure", restart_on_failure),
                       ("keep_vm", keep_vm), ("allow_restart_from_zero", allow_restart_from_zero)):
        if value is not None:
            setattr(plan, key, value)
    if push_env is not None:
        if not Path(push_env).is_file():
            raise LauncherError(f"--push-env {push_env}: file not found")
        plan.env_src = str(Path(push_env).absolute())
    watch.save(plan)
    try:
        return watch.watch(run_id, timing)
    except Interrupted:
        typer.echo(f"stopped watching {run_id}; the run goes on (`mllm watch {run_id}` picks it up again)", err=True)
        return 130


@app.command("watch")
def watch_cmd(
    run: str = typer.Argument(..., help="Run id (as `mllm launch` printed it)."),
    max_recoveries: Optional[int] = typer.Option(None, "--max-recoveries", min=0, help="Recoveries before giving up (default 3, or as set before)."),
    restart_on_failure: Optional[bool] = typer.Option(None, "--restart-on-failure/--no-restart-on-failure",
                                                      help="Also resume a job that exited non-zero by itself."),
    keep_vm: KeepVm = None,
    allow_restart_from_zero: AllowRestart = False,
    push_env: Optional[str] = typer.Option(None, "--push-env", metavar="FILE", help="Local env file to push again to a recreated VM (as `mllm env push --src`)."),
    detach: bool = typer.Option(False, "--detach", help="Run in the background (its own session; log in .mllm/watch/RUN.log)."),
    poll: Optional[float] = typer.Option(None, "--poll", min=0, help="Seconds between looks at the VM and the job (default 30, or $MLLM_WATCH_POLL)."),
    unreachable_after: Optional[float] = typer.Option(None, "--unreachable-after", min=0, help="Seconds of unreachable workers on a READY VM before it counts as dead (default 600, or $MLLM_WATCH_UNREACHABLE_AFTER)."),
    backoff: Optional[float] = typer.Option(None, "--backoff", min=0, help="First wait after a failed create, doubling (default 60, or $MLLM_WATCH_BACKOFF)."),
) -> None:
    """Supervise a launched run: when its spot VM is preempted (or its queued resource suspended,
    or its workers stay unreachable), delete it, create it again, bootstrap, sync the run's commit
    and resume from the last checkpoint; at the end, fetch the summary and delete the VM."""
    from launcher import watch

    if detach:
        watch.Timing.resolve(poll=poll, unreachable_after=unreachable_after, backoff=backoff)  # bad input: here
        argv = ["watch", run]
        for flag, value in (("--poll", poll), ("--unreachable-after", unreachable_after), ("--backoff", backoff)):
            if value is not None:
                argv += [flag, str(value)]
        if max_recoveries is not None:
            argv += ["--max-recoveries", str(max_recoveries)]
        if restart_on_failure is not None:
            argv.append("--restart-on-failure" if restart_on_failure else "--no-restart-on-failure")
        if keep_vm is not None:
            argv.append("--keep-vm" if keep_vm else "--delete-vm")
        if allow_restart_from_zero:
            argv.append("--allow-restart-from-zero")
        if push_env is not None:
            argv += ["--push-env", push_env]
        pid = watch.detach(run, argv)
        typer.echo(f"watching {run} in the background (pid {pid}); log: {watch.log_path(run)}; stop it with `kill {pid}`")
        return
    raise typer.Exit(_watch(run, max_recoveries, restart_on_failure, keep_vm, push_env, poll, unreachable_after, backoff,
                            allow_restart_from_zero or None))


@app.command("regress")
def regress_cmd(
    suite: Optional[str] = typer.Argument(None, help="A suite under configs/regress/ (cpu, sop-v6e8) or a YAML file "
                                                     "(default: cpu with --local, else sop-v6e8)."),
    vm: Vm = None, zone: Zone = None, project: Project = None, internal_ip: InternalIp = False,
    user: User = None, ssh_proxy: SshProxy = None, local: Local = False,
    overrides: list[str] = typer.Option([], "--set", metavar="[RUN:]KEY=VALUE",
                                        help="Override a config key of one run (RUN:) or of every run (repeatable)."),
    no_preflight: bool = typer.Option(False, "--no-preflight", envvar="MLLM_NO_PREFLIGHT",
                                      help="Launch the runs without compiling them for the VM's TPU type first."),
    compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="REPORT_A REPORT_B",
                                                      help="Print what changed between two .json reports; run nothing."),
    record: Optional[str] = typer.Option(None, "--record", metavar="REPORT",
                                         help="Store a .json report's observed values as its suite's baselines "
                                              "(configs/regress/baselines/SUITE.yaml: review the diff, commit it)."),
) -> None:
    """Run a regression suite (the seed runbook as one command): sync, versions, each run launched
    and followed like `mllm launch --follow`, its summary fetched and every check judged against the
    stored baselines; a table, and a report in reports/. Exit 0 only if every check passes."""
    from pathlib import Path

    from launcher import regress, sync

    if compare and any(compare):
        changes = regress.compare(regress.read_report(compare[0]), regress.read_report(compare[1]))
        typer.echo("\n".join(changes) if changes else "no changes")
        return
    if record:
        path, changes = regress.record(regress.read_report(record), sync.repo_root() if sync.head_or_none()
                                       else Path.cwd())
        typer.echo("\n".join(changes) if changes else "no baseline changed")
        typer.echo(f"wrote {path}: review it (`git diff {path}`) and commit it")
        return
    import os

    root = sync.repo_root() if not local or sync.head_or_none() else Path.cwd()  # a local suite may run outside git
    path = regress.suite_path(suite or ("cpu" if local else "sop-v6e8"), root).resolve()
    os.chdir(root)  # the suite's paths, runs/ and reports/ are the repository's
    s = regress.load_suite(path, root)
    sets = regress.overrides_by_run(s, list(overrides))
    regress.validate(s, sets, root)
    regress.check_reports_writable()
    if not local:
        sync.resolve_commit(root)  # a dirty tree is refused before any VM is touched
    with _cluster(vm, zone, project, "all", internal_ip, user, local, ssh_proxy) as c:
        report = regress.run_suite(s, c, sets, root, not no_preflight)
    js, md = regress.write_report(report)
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "check", "expected", "observed", "result")
    for r in report["runs"]:
        for ch in r["checks"]:
            table.add_row(r["name"], ch["check"], ch["expected"], ch["detail"], ch["status"])
    Console().print(table)
    typer.echo(f"{'PASSED' if report['passed'] else 'FAILED'}: report {md} ({js})")
    raise typer.Exit(0 if report["passed"] else 1)


@app.command("preflight")
def preflight_cmd(
    recipe: str = typer.Argument(..., help="Recipe, e.g. sft."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key (repeatable)."),
    accelerator_type: str = typer.Option("v6e-8", "--type", help="Accelerator type, e.g. v6e-8, v4-16."),
    as_json: AsJson = False,
    no_cache: bool = typer.Option(False, "--no-cache", help="Compile again even when a cached report exists."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="Skip XLA's cost-model estimate (its loop bodies "
                                                                   "compile one by one): memory only, about twice as fast."),
) -> None:
    """Compile the recipe's programs for a TPU slice on this machine (libtpu, no TPU, no VM):
    per-chip HBM, compile seconds, XLA's estimated step time and MFU. Exit 1 when it does not fit."""
    from launcher import preflight
    from mllm_jax.preflight import format_report

    report = preflight.run(recipe, config, list(overrides), accelerator_type, not no_cache, not no_estimate)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    raise typer.Exit(0 if report["fits"] else 1)


@app.command("status")
def status_cmd(run: RunId = None, local: Local = False, vm: Vm = None, zone: Zone = None, project: Project = None,
               worker: Workers = "all", internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
               as_json: AsJson = False) -> None:
    """Per worker: running / exited N / lost, last step and last log line."""
    from dataclasses import asdict

    with _cluster(vm, zone, project, worker, internal_ip, user, local, ssh_proxy) as c:
        r = c.run(run)
        found = r.status()
    if all(s.state == "missing" for s in found.values()):
        raise LauncherError(f"run {r.id}: not there (no runs/{r.id} on {'this machine' if local else 'the workers'})")
    if as_json:
        typer.echo(json.dumps({"run": r.id, "workers": [asdict(s) for s in found.values()]}, indent=2))
        return
    typer.echo(f"run {r.id}")
    for s in found.values():
        typer.echo(f"[w{s.worker}] {s.state:10s} step {s.last_step if s.last_step is not None else '-'}  {s.last_line}")


@app.command("logs")
def logs_cmd(run: RunId = None, local: Local = False, vm: Vm = None, zone: Zone = None, project: Project = None,
             worker: Workers = "all", internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
             follow_logs: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
             raw: bool = typer.Option(False, "--raw", help="The log's bytes as they are (terminal escapes included).")) -> None:
    """Print the run's logs, `[wK]`-prefixed; -f follows them until the job ends (exit: its code).
    Control characters are shown escaped (\\x1b) unless --raw."""
    with _cluster(vm, zone, project, worker, internal_ip, user, local, ssh_proxy) as c:
        code = c.run(run).logs(follow=follow_logs, raw=raw)
    raise typer.Exit(code or 0)


@app.command("stop")
def stop_cmd(run: RunId = None, local: Local = False, vm: Vm = None, zone: Zone = None, project: Project = None,
             worker: Workers = "all", internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None,
             grace: float = typer.Option(contracts.STOP_GRACE_SEC, "--grace", help="Seconds between TERM (checkpoint) and KILL.")) -> None:
    """Stop the run on every worker: TERM (the trainer checkpoints), then KILL after --grace."""
    from launcher import ssh

    from launcher import jobs

    if not 0 <= grace < float("inf"):
        raise LauncherError(f"--grace {grace:g}: expected seconds >= 0")
    with _cluster(vm, zone, project, worker, internal_ip, user, local, ssh_proxy) as c:
        r = c.run(run)
        outcomes = r.stop(grace)
    if all(o == jobs.NO_RUN for o in outcomes.values()):
        raise LauncherError(f"run {r.id}: not there (no runs/{r.id} on {'this machine' if local else 'the workers'})")
    for i, outcome in outcomes.items():
        ssh.emit(f"w{i}" if not local else "local", f"{r.id}: {outcome}")


@app.command("fetch-summary")
def fetch_summary_cmd(run: RunId = None, dest: str = typer.Option(contracts.RUNS_DIR, "--dest", help="Local folder."),
                      local: Local = False, vm: Vm = None, zone: Zone = None, project: Project = None,
                      internal_ip: InternalIp = False, user: User = None, ssh_proxy: SshProxy = None) -> None:
    """Copy run_summary.json, the resolved config and metrics.jsonl home; index the run."""
    from pathlib import Path

    from launcher import runs

    with _cluster(vm, zone, project, "0", internal_ip, user, local, ssh_proxy) as c:
        r = c.run(run)
        summary, entry = r.fetch_summary(Path(dest))
    for line in runs.describe(r.id, summary, entry):
        typer.echo(line)


@app.command("runs")
def runs_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The local index of fetched runs."""
    from launcher import runs

    skipped: list[str] = []
    index = list(runs.load_index(skipped).values())
    for why in skipped:
        typer.echo(f"warning: skipped {why}; fix or delete that entry", err=True)
    if as_json:
        typer.echo(json.dumps(index, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "vm", "recipe", "commit", "status", "eval/loss", "recoveries", "W&B")
    for e in index:
        loss = f"{e['eval_loss']:.4f}" if e["eval_loss"] is not None else "-"
        table.add_row(e["run"], str(e["vm"]), str(e["recipe"]), str(e["commit"])[:10], str(e["status"]), loss,
                      str(e.get("recoveries", 0)), e["wandb"] or "")
    Console().print(table)
