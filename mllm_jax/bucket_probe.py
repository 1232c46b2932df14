"""`python -m mllm_jax bucket-probe gs://BUCKET[/PREFIX]`: can this machine, with the credentials and
environment the trainer will have, write checkpoints there? It writes, reads back and deletes one
small object through gcsfs (what orbax's directory code uses; it honours STORAGE_EMULATOR_HOST),
so that a VM whose service account cannot write the bucket is refused before the job starts,
not after compute. The answer is one JSON line (contracts.BucketProbe).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from pathlib import Path

from mllm_jax.config import ConfigError
from mllm_jax.contracts import BUCKET_PROBE_PREFIX, BUCKET_PROBE_TIMEOUT_SEC, BucketProbe


def probe(url: str) -> BucketProbe:
    """Write, read back and delete URL/.mllm-probe-<random>; never raises."""
    try:
        import gcsfs  # credentials as orbax finds them: application default, then the VM's metadata

        path = f"{url.removeprefix('gs://').rstrip('/')}/{BUCKET_PROBE_PREFIX}{secrets.token_hex(8)}"
        fs = gcsfs.GCSFileSystem()
    except Exception as e:
        return {"ok": False, "status": None, "error": f"gcsfs: {_message(e)}"}
    data, step = secrets.token_bytes(32), "write"
    try:
        fs.pipe_file(path, data)
        step = "read back"
        back = fs.cat_file(path)
        step = "delete"
        fs.rm_file(path)
        if back != data:
            return {"ok": False, "status": None, "error": f"read back gs://{path}: different bytes"}
    except Exception as e:
        return {"ok": False, "status": _status(e), "error": f"{step} gs://{path}: {_message(e)}"}
    return {"ok": True, "status": None, "error": ""}


def _status(e: BaseException) -> int | None:
    """The HTTP status behind a gcsfs error (it raises 403 as OSError("Forbidden: ..."), 404 as
    FileNotFoundError, the rest as HttpError with `.code`)."""
    if isinstance(getattr(e, "code", None), int):
        return e.code
    if isinstance(e, FileNotFoundError):
        return 404
    if str(e).startswith("Forbidden:"):
        return 403
    return None


def _message(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "not found (no such bucket?)"  # gcsfs says only the path
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r"^Forbidden: \S+ ", "", text)[:500]  # gcsfs prefixes the path, which we already name


def main(url: str, env_file: str | None, timeout: float = BUCKET_PROBE_TIMEOUT_SEC) -> int:
    """Load the env file as `train` does (default ./.env), probe within `timeout`, print the
    JSON line; exit 0 when the bucket is writable, 1 when not."""
    if not url.startswith("gs://") or len(url) <= len("gs://"):
        raise ConfigError(f"bucket-probe {url!r}: expected gs://BUCKET[/PREFIX]")
    env_path = env_file or (".env" if Path(".env").is_file() else None)
    if env_path:
        from mllm_jax.envfile import load_env_file

        if not Path(env_path).is_file():
            raise ConfigError(f"--env-file: file not found: {env_path}")
        load_env_file(env_path)  # a binary file: ConfigError too (one line, exit 2)
    found: list[BucketProbe] = []
    worker = threading.Thread(target=lambda: found.append(probe(url)), daemon=True)
    worker.start()
    worker.join(timeout)
    result = found[0] if found else {"ok": False, "status": None,
                                     "error": f"no answer from GCS in {timeout:g}s (gcsfs retries a failing call)"}
    print(json.dumps(result), flush=True)
    if not found:
        os._exit(1)  # gcsfs's loop thread may still hold the call
    return 0 if result["ok"] else 1
