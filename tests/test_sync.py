"""Code sync over SSH to real sshd workers (private /root and /tmp each): git bundles carried by
SFTP, incremental after the first sync, dirty-tree snapshots that leave the user's branch, index
and stash alone, ignored files on the worker kept, and hostile refs never reaching a shell."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from harness.sshd import SshCluster, make_client_key

from launcher import ssh
from launcher.errors import LauncherError
from launcher.sync import SNAPSHOT_MESSAGE, resolve_commit, sync_all, sync_worker

pytestmark = pytest.mark.e2e  # real sshd workers


@pytest.fixture(scope="module")
def cluster():
    hosts = SshCluster(2).start()
    yield hosts
    hosts.stop()


@pytest.fixture(scope="module")
def workers(cluster) -> list[ssh.Worker]:
    return [ssh.Worker(i, h.ip, host_keys={h.host_key_type: h.host_key_b64}) for i, h in enumerate(cluster)]


@pytest.fixture(scope="module")
def conns(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    key = make_client_key(tmp)
    cluster.authorize(key.public_line)
    with ssh.Connections("root", key.private_key_path, tmp / "known_hosts") as c:
        yield c


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path) -> Path:
    """A throwaway repo: some source, ~200 KB of incompressible data, `runs/` ignored."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.name", "Test")
    git(r, "config", "user.email", "test@example.com")
    (r / ".gitignore").write_text("/runs/\n*.log\n")
    (r / "README.md").write_text("hello\n")
    (r / "pkg").mkdir()
    for i in range(20):
        (r / "pkg" / f"m{i}.py").write_text(f"X = {i}\n" * 50)
    (r / "data.bin").write_bytes(os.urandom(200_000))
    commit_all(r, "first")
    return r


def user_state(repo: Path) -> list[str | bytes]:
    """Branch, HEAD, the index file's bytes, stash, staged and unstaged diffs, status."""
    return [git(repo, "symbolic-ref", "HEAD"), git(repo, "rev-parse", "HEAD"), (repo / ".git" / "index").read_bytes(),
            git(repo, "stash", "list"), git(repo, "diff", "--cached"), git(repo, "diff"),
            git(repo, "--no-optional-locks", "status", "--porcelain")]


def remote(conns: ssh.Connections, w: ssh.Worker, command: str) -> str:
    code, out = ssh.capture(conns, w, command)
    assert code == 0, out
    return out.strip()


def remote_head(conns, w) -> str:
    return remote(conns, w, 'git -C "$HOME"/mllm-jax rev-parse HEAD')


def test_first_sync_full_then_incremental(repo, conns, workers):
    sha = resolve_commit(repo)
    assert sha == git(repo, "rev-parse", "HEAD")
    first = sync_all(conns, workers, repo, sha)
    assert [(r.worker, r.sha, r.full) for r in first] == [(0, sha, True), (1, sha, True)]
    assert all(r.bytes_sent > 200_000 for r in first)
    for w in workers:
        assert remote_head(conns, w) == sha
        assert remote(conns, w, "cat ~/mllm-jax/pkg/m3.py") == ("X = 3\n" * 50).strip()
        assert remote(conns, w, "sha256sum ~/mllm-jax/data.bin").split()[0] == \
            subprocess.run(["sha256sum", repo / "data.bin"], capture_output=True, text=True, check=True).stdout.split()[0]

    (repo / "pkg" / "m3.py").write_text("X = 'three'\n")
    second_sha = commit_all(repo, "second")
    second = sync_all(conns, workers, repo, resolve_commit(repo))
    assert [(r.sha, r.full) for r in second] == [(second_sha, False)] * 2
    assert all(0 < r.bytes_sent < first[0].bytes_sent / 20 for r in second), [r.bytes_sent for r in second]
    assert remote(conns, workers[1], "cat ~/mllm-jax/pkg/m3.py") == "X = 'three'"

    again = sync_worker(conns, workers[0], repo, second_sha)  # nothing new: nothing sent
    assert (again.sha, again.bytes_sent, again.full) == (second_sha, 0, False)
    back = sync_all(conns, workers, repo, sha)  # an older commit: the workers have its objects
    assert [(r.sha, r.bytes_sent) for r in back] == [(sha, 0), (sha, 0)]
    assert remote(conns, workers[0], "cat ~/mllm-jax/pkg/m3.py") == ("X = 3\n" * 50).strip()
    # No temporary bundle left on the workers, no temporary ref in the user's repo.
    assert all(remote(conns, w, "ls -a ~/mllm-jax/.git | grep -c mllm-sync || true") == "0" for w in workers)
    assert git(repo, "for-each-ref", "refs/mllm/") == ""


def test_dirty_tree_refused_or_snapshotted_without_touching_user_state(repo, conns, workers):
    head = git(repo, "rev-parse", "HEAD")
    (repo / "pkg" / "m1.py").write_text("stashed\n")
    git(repo, "stash", "push", "-q")  # a stash entry, to check it stays
    (repo / "README.md").write_text("edited, not committed\n")
    git(repo, "add", "README.md")  # something staged, to check the index is left as it was
    (repo / "pkg" / "m0.py").write_text("X = 'dirty'\n")  # unstaged change
    (repo / "new_file.txt").write_text("untracked but not ignored\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "local.txt").write_text("ignored locally\n")
    before = user_state(repo)

    with pytest.raises(LauncherError, match="uncommitted changes .*commit them, or pass --include-dirty"):
        resolve_commit(repo)
    with pytest.raises(LauncherError, match="cannot be combined with --ref"):
        resolve_commit(repo, git(repo, "commit-tree", "HEAD^{tree}", "-m", "elsewhere"), include_dirty=True)

    snap = resolve_commit(repo, include_dirty=True)
    assert snap != head and git(repo, "rev-parse", f"{snap}^") == head
    assert git(repo, "log", "-1", "--format=%s", snap) == SNAPSHOT_MESSAGE
    assert user_state(repo) == before

    results = sync_all(conns, workers, repo, snap, remote_dir="~/dirty")
    assert [r.sha for r in results] == [snap, snap]
    for w in workers:
        assert remote(conns, w, "cat ~/dirty/README.md ~/dirty/pkg/m0.py ~/dirty/new_file.txt").splitlines() == [
            "edited, not committed", "X = 'dirty'", "untracked but not ignored"]
        assert remote(conns, w, "test -e ~/dirty/runs/local.txt || echo absent") == "absent"

    # Only an untracked file counts as dirty too.
    git(repo, "checkout", "-q", "--", ".")
    git(repo, "reset", "-q", "--hard")
    assert git(repo, "status", "--porcelain") == "?? new_file.txt"
    with pytest.raises(LauncherError, match="1 path\\(s\\), e.g. new_file.txt"):
        resolve_commit(repo)


def test_worker_keeps_ignored_files_and_loses_untracked_ones(repo, conns, workers):
    w = workers[0]
    sha = resolve_commit(repo)
    sync_worker(conns, w, repo, sha, remote_dir="~/keep")
    remote(conns, w, "cd ~/keep && mkdir -p runs/r1 && echo ckpt > runs/r1/x && echo log > train.log && "
                     "echo stray > stray.txt && mkdir -p junk/d && echo j > junk/d/f && echo changed > README.md")
    result = sync_worker(conns, w, repo, sha, remote_dir="~/keep")
    assert (result.sha, result.bytes_sent) == (sha, 0)
    assert remote(conns, w, "cd ~/keep && cat runs/r1/x train.log README.md && ls stray.txt junk 2>&1 | wc -l && "
                            "git status --porcelain").splitlines() == ["ckpt", "log", "hello", "2"]


def test_remote_dir_quoting_and_refusals(repo, conns, workers):
    w = workers[1]
    sha = resolve_commit(repo)
    odd = "~/odd dir/it's $HOME `x`"
    assert sync_worker(conns, w, repo, sha, remote_dir=odd).sha == sha
    assert remote(conns, w, f"cat \"$HOME\"/{shlex.quote(odd[2:])}/README.md") == "hello"
    abs_dir = "/root/abs-sync"
    assert sync_worker(conns, w, repo, sha, remote_dir=abs_dir).sha == sha

    remote(conns, w, "mkdir -p ~/not-a-repo && echo mine > ~/not-a-repo/keep.txt")
    with pytest.raises(LauncherError, match=r"^worker 1 \(.*\): preparing the repo failed \(exit 3\): .*not-a-repo is "
                                            "not empty and not a git repository"):
        sync_worker(conns, w, repo, sha, remote_dir="~/not-a-repo")
    assert remote(conns, w, "cat ~/not-a-repo/keep.txt") == "mine"
    for home in ("~", "~/", "/root/.", "/"):
        with pytest.raises(LauncherError, match="refusing to sync into"):
            sync_worker(conns, w, repo, sha, remote_dir=home)
    with pytest.raises(LauncherError, match="only ~ and ~/"):
        sync_worker(conns, w, repo, sha, remote_dir="~root/x")


def test_hostile_refs_are_not_commits_and_nothing_runs(repo, tmp_path):
    pwned = tmp_path / "pwned"
    for ref in (f"$(touch {pwned})", f"`touch {pwned}`", f"'; touch {pwned}; '", f'"; touch {pwned}; "',
                f"--output={pwned}", "-h", "--all", "HEAD:README.md", "", "HEAD\nmain"):
        with pytest.raises(LauncherError) as info:
            resolve_commit(repo, ref)
        assert (str(info.value).endswith(": not a commit in this repository") or str(info.value) == "--ref: empty"
                or str(info.value).endswith("control characters are not allowed in a ref"))
        assert "\n" not in str(info.value)
    assert str(pytest.raises(LauncherError, resolve_commit, repo, "nope").value) == \
        "--ref nope: not a commit in this repository"
    assert not pwned.exists() and not Path("/tmp/pwned").exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(LauncherError, match="plain: not a git repository"):
        resolve_commit(tmp_path / "plain")
    with pytest.raises(LauncherError, match="not a directory"):
        resolve_commit(tmp_path / "missing")


def test_branch_with_quotes_and_shell_syntax_syncs(repo, conns, workers, tmp_path):
    pwned = tmp_path / "pwned-by-branch"
    branch = f"feat/it's-\"q\"-$(touch${{IFS}}{pwned})-`id`"
    assert subprocess.run(["git", "check-ref-format", "--branch", branch], capture_output=True, check=False).returncode == 0
    git(repo, "checkout", "-q", "-b", branch)
    (repo / "branch.txt").write_text("on the odd branch\n")
    sha = commit_all(repo, "odd branch")
    git(repo, "checkout", "-q", "main")

    assert resolve_commit(repo, branch) == sha
    assert resolve_commit(repo, f"refs/heads/{branch}") == sha
    results = sync_all(conns, workers, repo, resolve_commit(repo, branch), remote_dir="~/branchy")
    assert [r.sha for r in results] == [sha, sha]
    for w in workers:
        assert remote(conns, w, "cat ~/branchy/branch.txt") == "on the odd branch"
        assert remote(conns, w, f"test -e {shlex.quote(str(pwned))} && echo yes || echo no") == "no"
    assert not pwned.exists()
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"


def test_sync_all_reports_every_failing_worker(repo, conns, workers):
    sha = resolve_commit(repo)
    for w in workers:
        remote(conns, w, "mkdir -p ~/occupied && echo x > ~/occupied/f")
    with pytest.raises(LauncherError) as info:
        sync_all(conns, workers, repo, sha, remote_dir="~/occupied")
    message = str(info.value)
    assert "worker 0 (" in message and "worker 1 (" in message and "\n" not in message
    with pytest.raises(LauncherError, match="not a full commit id"):
        sync_all(conns, workers, repo, "HEAD")


def test_a_full_disk_is_named_and_nothing_is_left_behind(repo, conns, workers):
    """Worker 1's repo dir on a small filesystem: too small for the commit's bundle, it is refused
    before anything is sent; big enough for the bundle but not the checkout, git's ENOSPC is
    reported as such. Either way the temporary bundle is gone and worker 0 is synced."""
    sha = resolve_commit(repo)
    full = "~/small/mllm-jax"
    remote(conns, workers[1], "mkdir -p ~/small && mount -t tmpfs -o size=256k tmpfs ~/small")
    try:
        for size in ("256k", "640k"):
            remote(conns, workers[1], f"mount -o remount,size={size} ~/small && rm -rf ~/small/mllm-jax")
            with pytest.raises(LauncherError) as info:
                sync_all(conns, workers, repo, sha, remote_dir=full)
            message = str(info.value)
            assert message.startswith("no space left on worker 1 (") and "\n" not in message, message
            if size == "256k":
                assert "KiB free, and syncing" in message, message
            else:
                assert "checking out" in message and "Out of diskspace" in message, message
            assert remote(conns, workers[1], f"ls -a {full}/.git | grep -c mllm-sync || true") == "0"
            assert remote(conns, workers[0], f"git -C {full} rev-parse HEAD") == sha
    finally:
        remote(conns, workers[1], "umount ~/small")
