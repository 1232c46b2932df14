"""Code sync: make the repository directory on every worker hold exactly one local commit.

Why bundles over our own SSH connection: a TPU VM may have no GitHub access (private repo, no
deploy key, no egress), and a commit that was never pushed (or a snapshot of a dirty working
tree) is not on GitHub anyway. `git bundle` packs exactly the objects the worker lacks; SFTP
carries them on the connection the launcher already holds. Each worker's repo keeps the last
commit it received in `refs/mllm/synced`, so the next sync sends only what is new since then.

Safety: the user's local branch, index, stash and working tree are never touched (bundling uses
a temporary ref under refs/mllm/, snapshots use a temporary index file). On the worker the repo
directory is reset with `checkout --force` and `clean -fd` (not -x, so ignored files such as
`runs/` survive); refs and paths only reach a shell quoted, and user-given refs only reach git
as argv elements after `--end-of-options`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from launcher import ssh
from launcher.errors import LauncherError
from launcher.ssh import Connections, Worker
from mllm_jax import contracts
from mllm_jax.contracts import REMOTE_REPO

SYNCED_REF = "refs/mllm/synced"  # on the worker: the commit it last received
# Local and temporary: `git bundle` needs a ref to name the commit it carries. The pid keeps two
# mllm processes on one repo apart; _REF_LOCK keeps threads of this one apart.
BUNDLE_REF = f"refs/mllm/bundle-tmp-{os.getpid()}"
SNAPSHOT_MESSAGE = "mllm snapshot of working tree"
_REF_LOCK = threading.Lock()
_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # sha1 or sha256 object names


@dataclass
class SyncResult:
    worker: int
    sha: str
    bytes_sent: int
    seconds: float
    full: bool
    """True when the whole history of `sha` was sent (the worker had nothing we could build on)."""


# ---------------------------------------------------------------------------------------------
# Local side


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """git with argv (never a shell), in `repo`; a failure is a one-line LauncherError."""
    try:
        proc = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LauncherError("git is not installed on this machine") from None
    except NotADirectoryError:
        raise LauncherError(f"{repo}: not a directory") from None
    if check and proc.returncode != 0:
        raise LauncherError(f"{repo}: git {args[0]} failed: {_one_line(proc.stderr or proc.stdout)}")
    return proc


def _one_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[-limit:]


def _show(ref: str) -> str:
    """The ref as typed, unless it holds control characters (keep the message one line)."""
    return ref if ref.isprintable() else repr(ref)


def repo_root(where: Path | None = None) -> Path:
    """The git repository around `where` (default: the current directory): what sync ships."""
    top = _git(where or Path.cwd(), "rev-parse", "--show-toplevel", check=False)
    if top.returncode:
        raise LauncherError("not inside a git repository: mllm sync/launch ship the current repo's commit")
    return Path(top.stdout.strip())


def head_or_none(where: Path | None = None) -> str | None:
    """HEAD's sha where there is a repository with a commit, else None (a local run outside git)."""
    head = _git(where or Path.cwd(), "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    return head.stdout.strip() if head.returncode == 0 else None


def _has_commit(repo: Path, sha: str) -> bool:
    return _git(repo, "cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode == 0


def resolve_commit(repo: Path, ref: str = "HEAD", include_dirty: bool = False) -> str:
    """Full SHA of `ref` in the repo at `repo`. Refuses a dirty working tree (what would run on the
    workers is not what the user sees) unless `include_dirty`, which snapshots the working tree
    (tracked + untracked non-ignored files) as a commit on top of HEAD, leaving the user's branch,
    index and stash alone. The dirty check applies only when `ref` is the commit checked out: an
    explicit other commit is unrelated to the working tree."""
    repo = Path(repo)
    if not repo.is_dir():
        raise LauncherError(f"{repo}: not a directory")
    top = _git(repo, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise LauncherError(f"{repo}: not a git repository ({_one_line(top.stderr)})")
    if not ref:
        raise LauncherError("--ref: empty")
    if contracts.control_chars(ref):
        raise LauncherError(f"--ref {ref!r}: control characters are not allowed in a ref")
    found = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False)
    sha = found.stdout.strip()
    if found.returncode != 0 or not _SHA.fullmatch(sha):
        raise LauncherError(f"--ref {_show(ref)}: not a commit in this repository")
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).stdout.strip()
    if sha != head:
        if include_dirty:
            raise LauncherError(f"--include-dirty snapshots the working tree, which is based on HEAD "
                                f"({head[:12] or 'no commit'}); it cannot be combined with --ref {_show(ref)}")
        return sha
    # --no-optional-locks: status must not even refresh the user's index.
    status = _git(repo, "--no-optional-locks", "status", "--porcelain", "-z", "--no-renames",
                  "--untracked-files=normal").stdout
    changed = [entry[3:] for entry in status.split("\0") if len(entry) > 3 and entry[2] == " "]
    if not changed:
        return sha
    if not include_dirty:
        raise LauncherError(f"{repo}: the working tree has uncommitted changes ({len(changed)} path(s), e.g. "
                            f"{_show(changed[0])}); commit them, or pass --include-dirty to sync a snapshot")
    return _snapshot(Path(top.stdout.strip()), head)


def _snapshot(top: Path, head: str) -> str:
    """A commit of the whole working tree with `head` as parent, built in a throwaway index file."""
    with tempfile.TemporaryDirectory(prefix="mllm-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if _git(top, "var", "GIT_COMMITTER_IDENT", env=env, check=False).returncode != 0 or \
                _git(top, "var", "GIT_AUTHOR_IDENT", env=env, check=False).returncode != 0:
            for key, value in (("GIT_AUTHOR_NAME", "mllm"), ("GIT_AUTHOR_EMAIL", "mllm@localhost"),
                               ("GIT_COMMITTER_NAME", "mllm"), ("GIT_COMMITTER_EMAIL", "mllm@localhost")):
                env.setdefault(key, value)
        _git(top, "read-tree", head, env=env)
        _git(top, "add", "-A", "--", ":/", env=env)
        tree = _git(top, "write-tree", env=env).stdout.strip()
        return _git(top, "commit-tree", tree, "-p", head, "-m", SNAPSHOT_MESSAGE, env=env).stdout.strip()


class _Bundles:
    """Bundles made once per (commit, base) and shared by the workers of one sync: eight workers
    at the same commit cost one `git bundle create`. Files live in a local temp dir until close()."""

    def __init__(self, repo: Path):
        self.repo = repo
        self._dir: Path | None = None
        self._made: dict[tuple[str, str | None], Path] = {}
        self._lock = threading.Lock()

    def get(self, sha: str, base: str | None) -> Path:
        with self._lock:
            path = self._made.get((sha, base))
            if path is None:
                if self._dir is None:
                    self._dir = Path(tempfile.mkdtemp(prefix="mllm-bundle-"))
                path = self._dir / f"{len(self._made)}.bundle"
                with _REF_LOCK:
                    _git(self.repo, "update-ref", "--no-deref", BUNDLE_REF, sha)
                    try:
                        _git(self.repo, "bundle", "create", str(path), BUNDLE_REF, *([f"^{base}"] if base else []))
                    finally:
                        _git(self.repo, "update-ref", "-d", BUNDLE_REF, check=False)
                self._made[(sha, base)] = path
            return path

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Worker side


def remote_dir_word(remote_dir: str) -> str:
    """`remote_dir` as one shell word. A leading `~` becomes "$HOME": quoted, `~` would not be
    expanded by the remote shell, and unquoted, the rest of the path could be."""
    if not remote_dir or any(not c.isprintable() for c in remote_dir):
        raise LauncherError(f"remote dir {remote_dir!r}: expected a printable path such as {REMOTE_REPO}")
    if remote_dir == "~" or remote_dir.startswith("~/"):
        rest = remote_dir[2:]
        return '"$HOME"' + (f"/{shlex.quote(rest)}" if rest else "")
    if remote_dir.startswith("~"):
        raise LauncherError(f"remote dir {remote_dir}: only ~ and ~/... are expanded (the SSH user's home)")
    return shlex.quote(remote_dir)


def _remote(conns: Connections, w: Worker, script: str, what: str) -> dict[str, str]:
    """Run a shell script on the worker; collect its `MLLM_KEY value` lines; fail naming the worker.
    Markers rather than whole output because the login shell (~/.bashrc) may print too."""
    code, out = ssh.capture(conns, w, script)
    marks: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("MLLM_"):
            key, _, value = line.partition(" ")
            marks[key] = value
    if code != 0:
        reason = marks.get("MLLM_ERROR") or _one_line(out)
        if any(words in out for words in NO_SPACE):
            raise LauncherError(f"no space left on worker {w.index} ({w.host}): {what} failed: {reason}")
        raise LauncherError(f"worker {w.index} ({w.host}): {what} failed (exit {code}): {reason}")
    return marks


NO_SPACE = ("No space left on device", "Out of diskspace")
"""How a full disk shows in a worker's output: strerror(ENOSPC), and git's own words for it."""


# Creates the repo if missing and reports what the worker has. Refuses `/`, the home directory,
# and a non-empty directory that is not a git repo: `clean -fd` there would delete the user's files.
_PROBE = r"""set -e
command -v git >/dev/null || {{ echo "MLLM_ERROR git is not installed on the worker"; exit 3; }}
mkdir -p -- {dir}
cd -- {dir}
here=$(pwd -P)
home=$(cd && pwd -P)
if [ "$here" = / ] || [ "$here" = "$home" ]; then echo "MLLM_ERROR refusing to sync into $here (/ or the home directory)"; exit 3; fi
if [ ! -e .git ]; then
  if [ -n "$(ls -A)" ]; then echo "MLLM_ERROR $here is not empty and not a git repository; refusing to overwrite it"; exit 3; fi
  git -c init.defaultBranch=main init -q
fi
synced=$(git rev-parse -q --verify '{ref}^{{commit}}' || true)
gitdir=$(git rev-parse --absolute-git-dir)
tmp=$(mktemp "$gitdir/mllm-sync.XXXXXX")
echo "MLLM_HERE $here"
echo "MLLM_SYNCED $synced"
echo "MLLM_TMP $tmp"
echo "MLLM_FREE_KIB $(df -Pk . | awk 'NR==2 {{print $4}}')"
"""

_APPLY = r"""set -e
cd -- {here}
trap {cleanup} EXIT
{update}
git -c advice.detachedHead=false checkout -q --detach --force {sha}
git clean -fdq
head=$(git rev-parse HEAD)
echo "MLLM_HEAD $head"
"""


def _sync(conns: Connections, w: Worker, repo: Path, sha: str, remote_dir: str, bundles: _Bundles) -> SyncResult:
    start = time.perf_counter()
    marks = _remote(conns, w, _PROBE.format(dir=remote_dir_word(remote_dir), ref=SYNCED_REF), "preparing the repo")
    here, synced, tmp = marks.get("MLLM_HERE", ""), marks.get("MLLM_SYNCED", "").strip(), marks.get("MLLM_TMP", "")
    if not here or not tmp:
        raise LauncherError(f"worker {w.index} ({w.host}): preparing the repo printed no paths")
    if not _SHA.fullmatch(synced):
        synced = ""  # nothing received yet (or something we do not understand: send everything)

    bundle: Path | None = None
    full = False
    if synced == sha:
        pass  # objects there already; checkout + clean still restore the tree
    elif synced and _has_commit(repo, synced):
        if _git(repo, "merge-base", "--is-ancestor", sha, synced, check=False).returncode != 0:
            bundle = bundles.get(sha, synced)  # else: an older commit, whose objects the worker has
    else:
        bundle, full = bundles.get(sha, None), True

    sent = 0
    if bundle is not None:
        sent = bundle.stat().st_size
        free = marks.get("MLLM_FREE_KIB", "").strip()
        if free.isdigit() and int(free) * 1024 < 2 * sent:  # the bundle, then the objects fetched from it
            _remove(conns, w, tmp)
            raise LauncherError(f"no space left on worker {w.index} ({w.host}): {here} has {int(free):,} KiB free, "
                                f"and syncing {sha[:12]} needs about {2 * sent // 1024:,} KiB; free some space there")
        _put(conns, w, bundle, tmp, here)
        update = f"git fetch -q --no-tags {shlex.quote(tmp)} {shlex.quote(f'+{BUNDLE_REF}:{SYNCED_REF}')}"
    else:
        update = f"git update-ref {SYNCED_REF} {sha}"
    cleanup = shlex.quote(f"rm -f -- {shlex.quote(tmp)}")  # a trap's command is itself one word
    script = _APPLY.format(here=shlex.quote(here), cleanup=cleanup, update=update, sha=sha)
    marks = _remote(conns, w, script, f"checking out {sha[:12]} in {here}")
    return SyncResult(worker=w.index, sha=marks.get("MLLM_HEAD", "").strip(), bytes_sent=sent,
                      seconds=time.perf_counter() - start, full=full)


def _put(conns: Connections, w: Worker, bundle: Path, tmp: str, here: str) -> None:
    """Upload the bundle to `tmp`; a failed upload (a disk that filled up meanwhile, a dropped
    connection) is removed again, not left to fill the worker's disk."""
    try:
        sftp = conns.client(w).open_sftp()
        try:
            sftp.put(str(bundle), tmp)
        finally:
            sftp.close()
    except (paramiko.SSHException, OSError, EOFError) as e:
        try:
            _remove(conns, w, tmp)
            code, free = ssh.capture(conns, w, f"df -Pk {shlex.quote(here)} | awk 'NR==2 {{print $4}}'")
        except (paramiko.SSHException, OSError, EOFError):
            raise LauncherError(f"worker {w.index} ({w.host}): sync failed: {type(e).__name__}: {e}") from None
        if not code and free.strip().isdigit() and int(free.strip()) * 1024 < bundle.stat().st_size:
            raise LauncherError(f"no space left on worker {w.index} ({w.host}): uploading the commit to {here} "
                                f"failed with {int(free.strip()):,} KiB free; free some space there") from None
        raise


def _remove(conns: Connections, w: Worker, tmp: str) -> None:
    ssh.capture(conns, w, f"rm -f -- {shlex.quote(tmp)}")


def _sync_named(conns: Connections, w: Worker, repo: Path, sha: str, remote_dir: str, bundles: _Bundles) -> SyncResult:
    """_sync with transport errors (paramiko, OSError) turned into a LauncherError naming the worker."""
    if not _SHA.fullmatch(sha) or not _has_commit(repo, sha):
        raise LauncherError(f"{sha!r}: not a full commit id in {repo} (use resolve_commit)")
    try:
        return _sync(conns, w, Path(repo), sha, remote_dir, bundles)
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise LauncherError(f"worker {w.index} ({w.host}): sync failed: {type(e).__name__}: {e}") from None


def sync_worker(conns: Connections, w: Worker, repo: Path, sha: str, remote_dir: str = REMOTE_REPO) -> SyncResult:
    """Make `remote_dir` on one worker hold exactly commit `sha` of the local repo at `repo`."""
    bundles = _Bundles(Path(repo))
    try:
        return _sync_named(conns, w, Path(repo), sha, remote_dir, bundles)
    finally:
        bundles.close()


def sync_all(conns: Connections, workers: list[Worker], repo: Path, sha: str,
             remote_dir: str = REMOTE_REPO) -> list[SyncResult]:
    """sync_worker on every worker in parallel (bundles shared), then insist that all of them ended
    at `sha`: a slice whose workers run different code fails in confusing ways much later."""
    bundles = _Bundles(Path(repo))

    def one(w: Worker) -> SyncResult | LauncherError:
        try:
            return _sync_named(conns, w, Path(repo), sha, remote_dir, bundles)
        except LauncherError as e:  # report every worker's failure, not just the first
            return e

    try:
        outcome = ssh.fan_out(workers, one)
    finally:
        bundles.close()
    errors = [str(r) for r in outcome.values() if isinstance(r, LauncherError)]
    if errors:
        raise LauncherError("; ".join(errors))
    results = [outcome[w.index] for w in workers]
    wrong = [f"worker {r.worker} is at {r.sha[:12] or '?'}" for r in results if isinstance(r, SyncResult) and r.sha != sha]
    if wrong:
        raise LauncherError(f"after sync, expected every worker at {sha[:12]}, but {', '.join(wrong)}")
    return results  # type: ignore[return-value]
