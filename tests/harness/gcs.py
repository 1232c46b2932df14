"""A GCS-protocol server on loopback: the JSON API's objects, as the real client libraries speak
it, selected through their documented endpoint overrides (`GcsServer.env`):

- tensorstore (orbax's array writer, OCDBT): `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` in place of credentials (tensorstore's docs and its own tests);
- gcsfs (etils' epath backend, which orbax uses for directories and small files):
  `STORAGE_EMULATOR_HOST` (and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`, see `env`).

Why our own and not `gcp-storage-emulator` (PyPI): that emulator ignores `ifGenerationMatch`
/`ifGenerationNotMatch` and sends no `x-goog-generation`, and tensorstore's OCDBT commits its
manifests by conditional writes on generations: two processes saving one checkpoint fail there
("Malformed StorageGeneration"). Real GCS semantics that matter here are kept: every write makes
a new generation, preconditions are checked atomically (412, 304), reads honour `Range` (206,
416), listing is by prefix and delimiter in name order with pages, and uploads are media,
multipart or resumable. Not modelled: ACLs, versioning, compose/rewrite, batch (gcsfs sends none
off Google). sshd "workers" share the test machine's network, so they reach it at 127.0.0.1 too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BUCKET = "mllm-test-bucket"
PAGE = 1000


@dataclass
class _Object:
    data: bytes
    generation: int
    content_type: str
    updated: str

    def resource(self, bucket: str, name: str) -> dict[str, Any]:
        return {"kind": "storage#object", "id": f"{bucket}/{name}/{self.generation}", "name": name, "bucket": bucket,
                "generation": str(self.generation), "metageneration": "1", "size": str(len(self.data)),
                "contentType": self.content_type, "timeCreated": self.updated, "updated": self.updated,
                "storageClass": "STANDARD",
                "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode()}


class _Failed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class GcsServer:
    """`with GcsServer() as gcs:` gs://`gcs.bucket` served at `gcs.url`; `gcs.objects(prefix)`
    lists what is stored, `gcs.requests` counts requests by method; `gcs.write_delay` (seconds)
    holds every write that long before it lands, so that a test can kill a writer mid-save;
    `gcs.deny_writes()` refuses uploads and deletes with GCS's 403, as for a caller without rights."""

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        self._objects: dict[str, _Object] = {}
        self._uploads: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._generation = int(time.time() * 1e6)
        self.requests: dict[str, int] = {}
        self.write_delay = 0.0
        self._denied: set[str | None] = set()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to use this server for gs:// paths."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
                # gcsfs's zonal/HNS bucket lookup asks the storage-control API, which needs real
                # credentials: off here (a warning per file otherwise), on by default on a VM.
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def deny_writes(self, identity: str | None = None) -> None:
        """Refuse uploads and deletes with 403 and Google's error body, as GCS does for a caller
        without storage.objects.create/delete: from every caller (None), or from the one whose
        bearer token (Authorization header) is `identity`."""
        with self._lock:
            self._denied.add(identity)

    def allow_writes(self) -> None:
        """Lift every `deny_writes`."""
        with self._lock:
            self._denied.clear()

    def objects(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._objects if n.startswith(prefix))

    def start(self) -> GcsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> GcsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API ---------------------------------------------------------------------------------

    def _new_generation(self) -> int:
        self._generation += 1
        return self._generation

    @staticmethod
    def _check(obj: _Object | None, query: dict[str, str], reading: bool = False) -> None:
        """ifGenerationMatch (0: must not exist) and ifGenerationNotMatch, as GCS checks them."""
        if "ifGenerationMatch" in query:
            want = int(query["ifGenerationMatch"])
            if (obj is None and want != 0) or (obj is not None and obj.generation != want):
                raise _Failed(412, "conditionNotMet: ifGenerationMatch")
        if "ifGenerationNotMatch" in query:
            want = int(query["ifGenerationNotMatch"])
            if obj is not None and obj.generation == want:
                raise _Failed(304 if reading else 412, "conditionNotMet: ifGenerationNotMatch")

    def _put(self, name: str, data: bytes, content_type: str, query: dict[str, str]) -> dict[str, Any]:
        if not name:
            raise _Failed(400, "object name required")
        time.sleep(self.write_delay)
        with self._lock:
            self._check(self._objects.get(name), query)
            obj = _Object(data, self._new_generation(), content_type or "application/octet-stream",
                          time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
            self._objects[name] = obj
            return obj.resource(self.bucket, name)

    def handle(self, method: str, path: str, query: dict[str, str], headers: Any,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.requests[method] = self.requests.get(method, 0) + 1
        b = re.escape(self.bucket)
        upload = re.fullmatch(rf"/upload/storage/v1/b/{b}/o", path)
        if upload or (method == "DELETE" and re.fullmatch(rf"/storage/v1/b/{b}/o/.+", path)):
            if refused := self._refused(headers, "storage.objects.create" if upload else "storage.objects.delete"):
                return refused
        if upload:
            return self._upload(method, query, headers, body)
        if m := re.fullmatch(rf"/(download/)?storage/v1/b/{b}/o/(.+)", path):  # download/: gcsfs's reads
            return self._object(method, urllib.parse.unquote(m.group(2)), {**query, **({"alt": "media"} if m.group(1) else {})},
                                headers)
        if re.fullmatch(rf"/storage/v1/b/{b}/o", path) and method == "GET":
            return _json(200, self._list(query))
        if re.fullmatch(rf"/storage/v1/b/{b}", path) and method == "GET":
            return _json(200, {"kind": "storage#bucket", "id": self.bucket, "name": self.bucket, "location": "US"})
        if path == "/storage/v1/b" and method == "GET":
            return _json(200, {"kind": "storage#buckets", "items": [{"name": self.bucket, "id": self.bucket}]})
        raise _Failed(404 if "/b/" in path else 501, f"{method} {path}: not served here")

    def _refused(self, headers: Any, permission: str) -> tuple[int, dict[str, str], bytes] | None:
        """GCS's 403 for a denied caller (None when this caller may write)."""
        auth = headers.get("Authorization") or ""
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else None
        with self._lock:
            if None not in self._denied and token not in self._denied:
                return None
        who = token or "Anonymous caller"
        message = (f"{who} does not have {permission} access to the Google Cloud Storage object. "
                   f"Permission '{permission}' denied on resource (or it may not exist).")
        return _json(403, {"error": {"code": 403, "message": message,
                                     "errors": [{"message": message, "domain": "global", "reason": "forbidden"}]}})

    def _object(self, method: str, name: str, query: dict[str, str], headers: Any) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            obj = self._objects.get(name)
            if obj is None:
                raise _Failed(404, f"No such object: {self.bucket}/{name}")
            if method == "DELETE":
                self._check(obj, query)
                del self._objects[name]
                return 204, {}, b""
            if method != "GET":
                raise _Failed(501, f"{method} on an object: not served here")
            self._check(obj, query, reading=True)
            meta = {"x-goog-generation": str(obj.generation), "x-goog-metageneration": "1",
                    "x-goog-stored-content-length": str(len(obj.data)), "ETag": f'"{obj.generation}"'}
            if query.get("alt") != "media":
                return _json(200, obj.resource(self.bucket, name), meta)
            data, code = obj.data, 200
            if rng := headers.get("Range"):
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                if not m:
                    raise _Failed(400, f"bad Range {rng}")
                size = len(data)
                if m.group(1):
                    start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                else:
                    start, end = max(size - int(m.group(2)), 0), size - 1
                if start >= size and size > 0 or (size == 0 and start > 0):
                    return 416, {**meta, "Content-Range": f"bytes */{size}"}, b""
                data, code = data[start:end + 1], 206
                meta["Content-Range"] = f"bytes {start}-{end}/{size}"
            return code, {**meta, "Content-Type": obj.content_type}, data

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        with self._lock:
            names = sorted(n for n in self._objects if n.startswith(prefix) and n >= start and (end is None or n < end))
            snapshot = {n: self._objects[n] for n in names}
        items, prefixes = [], set()
        for n in names:
            rest = n[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                items.append(n)
        after = query.get("pageToken", "")
        entries = sorted([(n, "item") for n in items if n > after] + [(p, "prefix") for p in prefixes if p > after])
        page = entries[:int(query.get("maxResults", PAGE))]
        out: dict[str, Any] = {"kind": "storage#objects",
                               "items": [snapshot[n].resource(self.bucket, n) for n, kind in page if kind == "item"],
                               "prefixes": [n for n, kind in page if kind == "prefix"]}
        if len(entries) > len(page):
            out["nextPageToken"] = page[-1][0]
        return out

    def _upload(self, method: str, query: dict[str, str], headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        kind = query.get("uploadType")
        if kind == "media" and method == "POST":
            return _json(200, self._put(query.get("name", ""), body, headers.get("Content-Type", ""), query))
        if kind == "multipart" and method == "POST":
            message = BytesParser(policy=HTTP).parsebytes(
                f"Content-Type: {headers.get('Content-Type')}\r\n\r\n".encode() + body)
            meta_part, data_part = list(message.iter_parts())[:2]
            meta = json.loads(meta_part.get_payload(decode=True) or b"{}")
            return _json(200, self._put(meta.get("name") or query.get("name", ""), data_part.get_payload(decode=True),
                                        meta.get("contentType") or data_part.get_content_type(), query))
        if kind == "resumable":
            if "upload_id" not in query:  # start a session
                meta = json.loads(body or b"{}")
                upload_id = f"u{self._new_generation()}"
                self._uploads[upload_id] = {"name": meta.get("name") or query.get("name", ""), "data": b"",
                                            "type": headers.get("X-Upload-Content-Type", ""), "query": query}
                location = f"{self.url}/upload/storage/v1/b/{self.bucket}/o?uploadType=resumable&upload_id={upload_id}"
                return 200, {"Location": location}, b""
            session = self._uploads.get(query["upload_id"])
            if session is None:
                raise _Failed(404, "no such upload session")
            m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", headers.get("Content-Range", "bytes */*").strip())
            if m and m.group(1) is not None:
                session["data"] = session["data"][:int(m.group(1))] + body
            total = m.group(3) if m else "*"
            if total != "*" and len(session["data"]) >= int(total):
                del self._uploads[query["upload_id"]]
                return _json(200, self._put(session["name"], session["data"], session["type"], session["query"]))
            done = len(session["data"])
            return 308, ({"Range": f"bytes=0-{done - 1}"} if done else {}), b""
        raise _Failed(400, f"uploadType={kind} with {method}: not served here")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    code, headers, data = server.handle(self.command, url.path, query, self.headers, body)
                except _Failed as e:
                    code, headers, data = _json(e.code, {"error": {"code": e.code, "message": str(e)}})
                    if e.code == 304:
                        data = b""
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that dies mid-request (a preempted worker) is not the server's error."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _json(code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return code, {**(headers or {}), "Content-Type": "application/json; charset=UTF-8"}, json.dumps(payload).encode()
