"""TPU VMs through the Cloud TPU API v2 (`google-cloud-tpu`), no gcloud binary.

Credentials are google-auth's Application Default Credentials. `MLLM_TPU_API_ENDPOINT`
(e.g. http://127.0.0.1:8080) points the client at another server over REST with anonymous
credentials: that is how the tests run it against a local Cloud TPU REST server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from google.api_core import exceptions as gexc
from google.api_core import operation
from google.cloud import tpu_v2

from launcher.errors import LauncherError

ENV_ENDPOINT = "MLLM_TPU_API_ENDPOINT"
# Runtime image per TPU generation when --version auto (the seed runbooks' choices).
RUNTIME_VERSIONS = {
    "v6e": "v6e-ubuntu-2404",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v4": "tpu-ubuntu2204-base",
}
_TYPE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_zone(zone: str) -> str:
    if not _ZONE.match(zone):
        raise LauncherError(f"--zone {zone!r}: expected a zone such as us-east1-d")
    return zone


def check_type(accelerator_type: str) -> str:
    if not _TYPE.match(accelerator_type):
        raise LauncherError(
            f"--type {accelerator_type!r}: expected <generation>-<cores> with generation one of "
            f"{', '.join(RUNTIME_VERSIONS)} (e.g. v6e-8)"
        )
    return accelerator_type


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise LauncherError(f"--vm {name!r}: expected lowercase letters, digits and '-', starting with a letter")
    return name


def runtime_version(accelerator_type: str, version: str) -> str:
    """The runtime image: as given, or the generation's default for `auto`."""
    return RUNTIME_VERSIONS[check_type(accelerator_type).split("-")[0]] if version == "auto" else version


def make_client() -> tpu_v2.TpuClient:
    endpoint = os.environ.get(ENV_ENDPOINT)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
    return tpu_v2.TpuClient()


def resolve_project(given: str | None) -> str:
    """--project, MLLM_PROJECT, CLOUDSDK_CORE_PROJECT, then the ADC project."""
    project = given or os.environ.get("MLLM_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
    if not project and not os.environ.get(ENV_ENDPOINT):
        import google.auth

        with contextlib.suppress(Exception):
            project = google.auth.default()[1]
    if not project:
        raise LauncherError("no project: pass --project, or set MLLM_PROJECT or CLOUDSDK_CORE_PROJECT")
    return project


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn the API's refusals into one clear line. (Over REST the client raises by HTTP status:
    Forbidden, BadRequest, Conflict, TooManyRequests; operations raise by gRPC code.)"""
    try:
        yield
    except gexc.NotFound as e:
        raise LauncherError(f"{what}: not found ({e.message})") from None
    except (gexc.Forbidden, gexc.PermissionDenied) as e:
        raise LauncherError(f"{what}: permission denied ({e.message}); check the project and your credentials") from None
    except (gexc.ResourceExhausted, gexc.TooManyRequests) as e:
        raise LauncherError(f"{what}: quota or capacity exhausted ({e.message})") from None
    except (gexc.BadRequest, gexc.InvalidArgument) as e:
        raise LauncherError(f"{what}: invalid argument ({e.message})") from None
    except (gexc.Conflict, gexc.AlreadyExists) as e:
        raise LauncherError(f"{what}: already exists ({e.message})") from None
    except gexc.GoogleAPICallError as e:
        raise LauncherError(f"{what}: {type(e).__name__} ({e.message})") from None


@dataclass
class Zone:
    """One project's zone in the Cloud TPU API."""

    project: str
    zone: str
    client: tpu_v2.TpuClient

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def node_path(self, name: str) -> str:
        return f"{self.parent}/nodes/{name}"

    def create(self, name: str, accelerator_type: str, version: str, spot: bool, ssh_public_key: str,
               timeout: float, wait: bool = True) -> tpu_v2.Node | None:
        node = tpu_v2.Node(
            accelerator_type=accelerator_type,
            runtime_version=version,
            network_config=tpu_v2.NetworkConfig(enable_external_ips=True),
            scheduling_config=tpu_v2.SchedulingConfig(spot=spot),
            labels={"created-by": "mllm"},
            metadata={"ssh-keys": f"root:{ssh_public_key}"},
        )
        with api_errors(f"creating TPU VM {name} in {self.zone}"):
            op = self.client.create_node(parent=self.parent, node=node, node_id=name)
            return wait_for(op, timeout, f"creating {name} ({accelerator_type})") if wait else None

    def get(self, name: str) -> tpu_v2.Node:
        with api_errors(f"TPU VM {name} in {self.zone}"):
            return self.client.get_node(name=self.node_path(name))

    def list(self) -> list[tpu_v2.Node]:
        with api_errors(f"listing TPU VMs in {self.zone}"):
            return list(self.client.list_nodes(parent=self.parent))

    def delete(self, name: str, timeout: float) -> None:
        with api_errors(f"deleting TPU VM {name} in {self.zone}"):
            wait_for(self.client.delete_node(name=self.node_path(name)), timeout, f"deleting {name}")

    def host_keys(self, name: str) -> dict[int, dict[str, str]]:
        """Worker index -> {key type: base64 key} as the VM's guest agent published them."""
        with api_errors(f"host keys of {name}"):
            resp = self.client.get_guest_attributes(request={"name": self.node_path(name), "query_path": "hostkeys/"})
        keys: dict[int, dict[str, str]] = {}
        for worker, attrs in enumerate(resp.guest_attributes):  # one entry per worker, in worker order
            for item in attrs.query_value.items:
                if item.namespace == "hostkeys":
                    keys.setdefault(worker, {})[item.key] = item.value
        return keys


def wait_for(op: operation.Operation, timeout: float, what: str) -> Any:
    """Wait for a long-running operation with a spinner; a timeout is a clear error."""
    from rich.console import Console

    with Console(stderr=True).status(f"{what} ..."):
        try:
            return op.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise LauncherError(f"{what}: still running after {timeout:.0f}s (operation {op.operation.name})") from None


def worker_ips(node: tpu_v2.Node, internal: bool = False) -> list[str]:
    """Worker addresses in worker order: external IPs unless `internal`."""
    return [ep.ip_address if internal or not ep.access_config.external_ip else ep.access_config.external_ip
            for ep in node.network_endpoints]
