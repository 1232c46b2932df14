"""A TPU slice for end-to-end tests: the local Cloud TPU API (tpu_api.py) whose v6e-N nodes get
N/8 workers from a pool of real sshd hosts (sshd.py), as a VM's workers would be.

Why here: every SSH end-to-end test needs the same wiring (workers per accelerator type, the
guest agent's part of putting the node's `ssh-keys` metadata into each worker's authorized_keys).
"""

from __future__ import annotations

import threading
from typing import Any

from harness.sshd import SshCluster, SshHost
from harness.tpu_api import FakeTpuApi

ZONE = "us-east1-d"


class Slice:
    """`Slice(hosts).api` is a FakeTpuApi (not started) over `hosts`; `api_kwargs` go to it
    (e.g. `qr_wait=1.5`), with operations of 0.1 s by default."""

    def __init__(self, hosts: SshCluster, publish_keys: bool = True, key_delay: float = 0.0,
                 internal_names: dict[str, str] | None = None, **api_kwargs: Any):
        """`internal_names`: host IP -> the internal address the API reports for it (e.g. a name
        only a bastion's /etc/hosts resolves: a worker with no route from the laptop)."""
        self.hosts = hosts
        self.internal_names = internal_names or {}
        self.publish_keys = publish_keys
        self.key_delay = key_delay
        """Seconds between a metadata update and the guest agent writing the keys (Google: several)."""
        self._machines = threading.Lock()
        """Held while a preemption replaces machines: a node created meanwhile waits for the new ones."""
        self.api = FakeTpuApi(self.hosts_for_node, on_create=self.authorize, on_update=self.metadata_changed,
                              **{"op_delay": 0.1, **api_kwargs})

    def hosts_for_node(self, node_id: str, accelerator_type: str) -> list[dict]:
        count = min(len(self.hosts), max(1, int(accelerator_type.split("-")[1]) // 8))
        with self._machines:
            return [{"ip": h.ip, "internal_ip": self.internal_names.get(h.ip, h.ip),
                     "host_keys": {h.host_key_type: h.host_public_key_line} if self.publish_keys else {}}
                    for h in self.hosts.hosts[:count]]

    def authorize(self, node: dict) -> None:
        """The node's machines boot (hosts a preemption replaced start now), then what the guest
        agent does with the node's `ssh-keys` metadata."""
        ips = self._ips(node)
        for h in self.hosts:
            if h.ip in ips and not h.running:
                h.start()
        self._write_keys(node)

    def metadata_changed(self, node: dict) -> None:
        """The guest agent notices new metadata `key_delay` seconds later (a timer: the API
        answers at once, as Google's does)."""
        timer = threading.Timer(self.key_delay, self._write_keys, args=(node,))
        timer.daemon = True
        timer.start()

    def _write_keys(self, node: dict) -> None:
        """root's lines of `ssh-keys` into each worker's authorized_keys, unless OS Login is in
        force (the node's `enable-oslogin`, else the project's): then the agent ignores them. Other
        users' lines are accounts this harness does not make."""
        metadata = node.get("metadata") or {}
        project = node["name"].split("/")[1]
        os_login = metadata.get("enable-oslogin", self.api.project_metadata(project).get("enable-oslogin", ""))
        if os_login.strip().upper() == "TRUE":
            return
        ips = self._ips(node)
        for line in (metadata.get("ssh-keys") or "").splitlines():
            user, _, key = line.partition(":")
            if user != "root" or not key.strip():
                continue
            for h in self.hosts:
                if h.ip in ips and h.running and key.strip() not in h.authorized_keys_path.read_text():
                    h.authorize(key.strip())

    def _ips(self, node: dict) -> set[str]:
        """The host IPs of a node's workers (its endpoints may name them by internal address)."""
        names = {name: ip for ip, name in self.internal_names.items()}
        return {names.get(ep["ipAddress"], ep["ipAddress"]) for ep in node.get("networkEndpoints", [])}

    def preempt(self, name: str, state: str | None = "PREEMPTED") -> None:
        """What a spot preemption does: the node PREEMPTED (its queued resource SUSPENDING, then
        SUSPENDED), its workers' machines gone, every process killed at once and their disks
        lost. Fresh hosts (new host keys, empty /root and /tmp) take the same addresses, and
        boot when a node is created on them again. With `state=None` the API goes on saying
        READY, as for a hung machine: only the workers' silence tells."""
        ips = self._ips(self.api.node(name))
        if state is not None:
            self.api.set_state(name, state)
        with self._machines:  # a node created again (after the API said PREEMPTED) gets the new machines
            for i, h in enumerate(self.hosts.hosts):
                if h.ip in ips:
                    h.stop(grace=0)
                    self.hosts.hosts[i] = SshHost(ip=h.ip)
