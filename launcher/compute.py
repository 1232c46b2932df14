"""A project's common instance metadata through the Compute Engine API: whether OS Login is in
force decides who may log in to a TPU VM (root by a metadata key, or the caller's OS Login user).

One GET over REST with google-auth's AuthorizedSession and Application Default Credentials (no
client library for one call). `MLLM_COMPUTE_API_ENDPOINT` (e.g. http://127.0.0.1:8080) points it at
another server with anonymous credentials, as `MLLM_TPU_API_ENDPOINT` does for the Cloud TPU API:
the tests' FakeTpuApi serves both.
"""

from __future__ import annotations

import os
import time

import google.auth
import google.auth.exceptions
import requests
from google.auth.transport.requests import AuthorizedSession

from launcher.cloud import OS_LOGIN_KEY, _reason
from launcher.errors import LauncherError

ENV_ENDPOINT = "MLLM_COMPUTE_API_ENDPOINT"
DEFAULT_HOST = "https://compute.googleapis.com"
_SCOPES = ("https://www.googleapis.com/auth/compute.readonly",)
_TRANSIENT = frozenset({429, 500, 502, 503, 504})  # worth another try, as Google's clients retry them
_TRIES = 4
_BACKOFF_SEC = 1.0  # doubled after each failed try: 1, 2, 4 s
_TIMEOUT_SEC = 20.0  # per request, connect and read


def _session() -> tuple[AuthorizedSession, str]:
    """An authorized session and the API's base URL (the override, anonymous, if set)."""
    endpoint = os.environ.get(ENV_ENDPOINT)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return AuthorizedSession(AnonymousCredentials()), endpoint.rstrip("/")
    try:
        credentials, _ = google.auth.default(scopes=_SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise LauncherError(f"Compute Engine API: no usable credentials ({_reason(e)}); run "
                            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None
    return AuthorizedSession(credentials), DEFAULT_HOST


def _get(path: str, what: str) -> dict:
    """GET {base}/compute/v1/{path} as JSON; transient failures retried with backoff, the rest
    (403, 404, bad credentials, no answer) one LauncherError line."""
    session, base = _session()
    url = f"{base}/compute/v1/{path}"
    for attempt in range(_TRIES):
        last = attempt == _TRIES - 1
        try:
            resp = session.get(url, timeout=_TIMEOUT_SEC)
        except google.auth.exceptions.RefreshError as e:
            raise LauncherError(f"{what}: credentials refused ({_reason(e)}); run "
                                "`gcloud auth application-default login` again") from None
        except (requests.exceptions.RequestException, google.auth.exceptions.TransportError) as e:
            if last:
                raise LauncherError(f"{what}: cannot reach the Compute Engine API at {base} ({_reason(e)})") from None
        else:
            if resp.ok:
                try:
                    return resp.json()
                except ValueError:
                    raise LauncherError(f"{what}: the Compute Engine API at {base} answered with no JSON") from None
            if resp.status_code not in _TRANSIENT or last:
                raise LauncherError(f"{what}: {_refusal(resp)}")
        time.sleep(_BACKOFF_SEC * 2 ** attempt)
    raise AssertionError("unreachable")


def _refusal(resp: requests.Response) -> str:
    """Google's error body (`{"error": {"message": ...}}`) as one line, by HTTP status."""
    try:
        message = str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = resp.reason or f"HTTP {resp.status_code}"
    message = " ".join(message.split())[:300]
    if resp.status_code == 403:
        return f"permission denied ({message}); check the project and your credentials"
    if resp.status_code == 404:
        return f"not found ({message})"
    return f"HTTP {resp.status_code} ({message})"


def project_metadata(project: str) -> dict[str, str]:
    """The project's common instance metadata (every VM inherits it unless its own overrides a key)."""
    body = _get(f"projects/{project}", f"project {project} (Compute Engine)")
    items = (body.get("commonInstanceMetadata") or {}).get("items") or []
    return {str(i["key"]): str(i.get("value", "")) for i in items if isinstance(i, dict) and "key" in i}


def os_login_in_force(project: str, node_metadata: dict[str, str] | None = None) -> bool:
    """Whether a VM with `node_metadata` uses OS Login: its own `enable-oslogin` wins over the
    project's, and only TRUE (any case) turns it on, as Google reads it. (An organization policy,
    constraints/compute.requireOsLogin, can force it on regardless; no metadata shows that.)"""
    value = (node_metadata or {}).get(OS_LOGIN_KEY)
    if value is None:
        value = project_metadata(project).get(OS_LOGIN_KEY, "")
    return value.strip().upper() == "TRUE"
