"""A TPU slice for end-to-end tests: the local Cloud TPU API (tpu_api.py) whose nodes get as many
workers as the real accelerator type has hosts (v6e-8: 1; v4-16: 2; v6e-16: 4, at 4 chips per host
above 8 chips: the table preflight compiles for), from a pool of real sshd hosts (sshd.py).

Why here: every SSH end-to-end test needs the same wiring (workers per accelerator type, the
guest agent's part of putting the node's `ssh-keys` metadata into each worker's authorized_keys).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from harness.sshd import SshCluster, SshHost
from harness.tpu_api import FakeTpuApi

ZONE = "us-east1-d"


def worker_count(accelerator_type: str) -> int:
    """Hosts of a real slice of this type: its chips over the chips per host (preflight's table)."""
    from mllm_jax.preflight import TOPOLOGIES

    topology, per_host, _ = TOPOLOGIES[accelerator_type]
    return max(1, math.prod(int(n) for n in topology.split(":")[1].split("x")) // math.prod(per_host))


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
        self.os_login_keys: dict[str, tuple[int, str, list[str]]] = {}
        """POSIX username -> (uid, home, keys) imported through the OS Login API."""
        self.api = FakeTpuApi(self.hosts_for_node, on_create=self.authorize, on_update=self.metadata_changed,
                              on_os_login=self.os_login_key, **{"op_delay": 0.1, **api_kwargs})

    def hosts_for_node(self, node_id: str, accelerator_type: str) -> list[dict]:
        count = worker_count(accelerator_type)
        if count > len(self.hosts):  # the create fails (INTERNAL), naming why
            raise ValueError(f"{accelerator_type} has {count} workers; this slice has {len(self.hosts)} sshd hosts")
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
        if self._os_login(node):
            self._os_login_users(node)
            return
        ips = self._ips(node)
        for line in (metadata.get("ssh-keys") or "").splitlines():
            user, _, key = line.partition(":")
            if user != "root" or not key.strip():
                continue
            for h in self.hosts:
                if h.ip in ips and h.running and key.strip() not in h.authorized_keys_path.read_text():
                    h.authorize(key.strip())

    def os_login_key(self, username: str, uid: int, home: str, key: str) -> None:
        """A key imported through the OS Login API: on every worker of a node with OS Login in
        force, the account exists (OS Login's NSS module) and the key logs it in (its
        AuthorizedKeysCommand), at once."""
        uid_home_keys = self.os_login_keys.setdefault(username, (uid, home, []))
        uid_home_keys[2].append(key)
        for node in self.api.nodes.values():
            if node.get("state") == "READY" and self._os_login(node):
                self._os_login_users(node)

    def _os_login(self, node: dict) -> bool:
        """OS Login in force: the node's `enable-oslogin`, else its project's."""
        project = node["name"].split("/")[1]
        value = (node.get("metadata") or {}).get("enable-oslogin",
                                                  self.api.project_metadata(project).get("enable-oslogin", ""))
        return value.strip().upper() == "TRUE"

    def _os_login_users(self, node: dict) -> None:
        ips = self._ips(node)
        for h in self.hosts:
            if h.ip not in ips or not h.running:
                continue
            for username, (uid, home, keys) in self.os_login_keys.items():
                if username not in h.users():
                    h.add_user(username, uid, home)
                path = h.state_dir / f"authorized_keys.{username}"
                for key in keys:
                    if key not in path.read_text():
                        h.authorize(key, username)

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
