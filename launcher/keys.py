"""The launcher's own SSH identity: one ed25519 key pair in the user's config dir, made once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

if TYPE_CHECKING:
    from launcher import ssh

KEY_COMMENT = "mllm"


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "mllm"


def key_paths() -> tuple[Path, Path]:
    private = config_dir() / "id_ed25519"
    return private, private.with_suffix(".pub")


def ensure_key() -> tuple[Path, str]:
    """(private key path, public key line `ssh-ed25519 AAAA... mllm`), creating them (0600) once."""
    private, public = key_paths()
    if not private.exists():
        private.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public.write_text(f"{line.decode()} {KEY_COMMENT}\n")
    return private, public.read_text().strip()


def public_key() -> str:
    """The public key line if the key exists, else a placeholder (for --dry-run, which makes nothing)."""
    public = key_paths()[1]
    return public.read_text().strip() if public.exists() else "ssh-ed25519 <the launcher's key, made on first create> mllm"


def ssh_argv(w: "ssh.Worker", user: str, proxy: str | None = None) -> list[str]:
    """The system ssh's argv for an interactive shell on one worker: our key, and the host key
    the VM published (or the one pinned on first use), strictly checked; the proxy as given."""
    from launcher import ssh

    key_file, _ = ensure_key()
    trusted = w.host_keys or (ssh.pinned(w.pins, w.label) if w.pins else {})
    known = config_dir() / ("known_hosts.published" if trusted else "known_hosts")
    if trusted:
        known.write_text("".join(f"{w.host} {t} {k}\n" for t, k in trusted.items()))
    return ["ssh", "-i", str(key_file), "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", *(["-o", f"ProxyCommand={proxy}"] if proxy else []), f"{user}@{w.host}"]
