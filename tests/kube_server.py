"""A real HTTP server on 127.0.0.1 speaking the Kubernetes API for the calls m3tune makes.

    GET  /apis/argoproj.io/v1alpha1/namespaces/NS/workflowtemplates/NAME
    POST /apis/argoproj.io/v1alpha1/namespaces/NS/workflows          (generateName honoured)
    GET  /apis/argoproj.io/v1alpha1/namespaces/NS/workflows?labelSelector=…
    POST /apis/batch/v1/namespaces/NS/jobs                           (409 when the name exists)

It keeps objects in memory, records every request (method, path, query,
headers, body), checks the bearer token (401 otherwise) and answers
errors as the API server does: a `Status` object with code, reason and
message. `forbid` makes a path prefix answer 403, as RBAC would.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

from json_api_server import JSONHandler, ThreadedServer

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeServer(ThreadedServer):
    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.requests: list[dict] = []
        self.forbidden: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def put(self, plural: str, obj: dict) -> None:
        meta = obj["metadata"]
        self.objects[(plural, meta.get("namespace", "m3tune"), meta["name"])] = obj

    def forbid(self, path_prefix: str) -> None:
        self.forbidden.add(path_prefix)


class _Handler(JSONHandler):
    server: KubeServer

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with self.server.lock:
            self.server.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                         "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._send(401, status(401, "Unauthorized", "Unauthorized"))
        if any(url.path.startswith(p) for p in self.server.forbidden):
            m = _PATH.match(url.path)
            return self._send(403, status(403, "Forbidden", f'{m["plural"]} is forbidden: User "alice" cannot '
                                          f'{method.lower()} resource "{m["plural"]}" in API group "{m["group"]}" '
                                          f'in the namespace "{m["ns"]}"'))
        m = _PATH.match(url.path)
        if not m:
            return self._send(404, status(404, "NotFound", "the server could not find the requested resource"))
        key = (m["plural"], m["ns"])
        if method == "GET" and m["name"]:
            obj = self.server.objects.get((*key, m["name"]))
            if obj is None:
                return self._send(404, status(404, "NotFound", f'{m["plural"]}.{m["group"]} "{m["name"]}" not found'))
            return self._send(200, obj)
        if method == "GET":
            selector = dict(s.split("=", 1) for s in parse_qs(url.query).get("labelSelector", [""])[0].split(",") if s)
            items = [o for (plural, ns, _), o in self.server.objects.items() if (plural, ns) == key
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
            return self._send(200, {"apiVersion": f'{m["group"]}/{m["version"]}', "kind": "List",
                                    "metadata": {"resourceVersion": "1"}, "items": items})
        if method == "POST":
            meta = body.setdefault("metadata", {})
            if "name" not in meta:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = meta["name"]
            if (*key, name) in self.server.objects:
                return self._send(409, status(409, "AlreadyExists", f'{m["plural"]}.{m["group"]} "{name}" already exists'))
            meta.update(namespace=m["ns"], uid=str(uuid.uuid4()), resourceVersion="1",
                        creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self.server.objects[(*key, name)] = body
            return self._send(201, body)
        return self._send(405, status(405, "MethodNotAllowed", "method not allowed"))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


def kubeconfig(server_url: str, token: str, namespace: str = "m3tune") -> str:
    """A kubeconfig (YAML text) for the loopback server, with a bearer token."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "loopback",
        "clusters": [{"name": "loopback", "cluster": {"server": server_url}}],
        "users": [{"name": "alice", "user": {"token": token}}],
        "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "alice", "namespace": namespace}}],
    })
