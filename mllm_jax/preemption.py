"""GCE's preemption notice from the metadata server: a spot TPU VM's `instance/preempted` turns
TRUE when it is being preempted (then SIGTERM, then about 30 s until it goes). The trainer treats
the notice like SIGTERM: checkpoint, then stop, all processes of a slice at the same step.

Hand-written (urllib, a long poll with `wait_for_change`) rather than google-auth's metadata
helpers, which are private and have no long poll."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

HOST_ENV = "GCE_METADATA_HOST"
"""The metadata server's host[:port] (google-auth's override too); unset: metadata.google.internal
on a Google Compute Engine machine, nothing elsewhere."""
PREEMPTED = "/computeMetadata/v1/instance/preempted"


def metadata_host() -> str | None:
    """Where to ask, or None off GCE (no DNS lookups, no waiting on a laptop or in CI)."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    try:
        product = Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        return None
    return "metadata.google.internal" if "Google" in product else None


def watch(on_preempted: Callable[[], None], host: str | None = None) -> threading.Thread | None:
    """Long-poll `instance/preempted` in a daemon thread and call `on_preempted` once when it is
    TRUE. Gives up quietly after a few failed requests (no metadata server: nothing to watch)."""
    host = host or metadata_host()
    if host is None:
        return None

    def loop() -> None:
        etag, failures = None, 0
        while True:
            url = f"http://{host}{PREEMPTED}?wait_for_change=true" + (f"&last_etag={etag}" if etag else "")
            try:
                request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
                with urllib.request.urlopen(request, timeout=3600) as r:
                    value, etag = r.read().decode().strip(), r.headers.get("ETag")
                failures = 0
            except OSError:
                failures += 1
                if failures > 5:
                    return
                time.sleep(min(2.0 ** failures, 30.0))
                continue
            if value == "TRUE":
                on_preempted()
                return

    thread = threading.Thread(target=loop, name="preemption-notice", daemon=True)
    thread.start()
    return thread
