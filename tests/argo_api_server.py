"""A real HTTP(S) server on 127.0.0.1 speaking the Argo Server's API for the calls m3tune makes.

    GET  BASE/api/v1/workflow-templates/NS/NAME
    POST BASE/api/v1/workflows/NS                  WorkflowCreateRequest (generateName honoured; 409 on a name taken)
    GET  BASE/api/v1/workflows/NS?listOptions.labelSelector=…
    PUT  BASE/api/v1/workflows/NS/NAME/retry       WorkflowRetryRequest (400 as Argo when the phase forbids it)

Every request body is checked against the Argo API's schema as Hera generates it from Argo's OpenAPI
specification (`hera.workflows.models`): parsed by the request's model, and a key the model does not know is
refused (400, as the real server's JSON decoder does) instead of being dropped. The bearer token is checked
(401 otherwise); `fail(prefix, code)` makes a path answer 403 or 409. Errors are the grpc-gateway's
`{"code", "message"}` objects the Argo Server answers; outside BASE/api/ it answers its web UI's page (HTML,
200, no token needed), as the real server does. Objects live in memory; every request is recorded
(method, path, query, headers, the body as sent).
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import threading
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

from json_api_server import JSONHandler, ThreadedServer

_ROUTES = [
    ("GET", re.compile(r"^/api/v1/workflow-templates/(?P<ns>[^/]+)/(?P<name>[^/]+)$"), "get_template"),
    ("POST", re.compile(r"^/api/v1/workflows/(?P<ns>[^/]+)$"), "create"),
    ("GET", re.compile(r"^/api/v1/workflows/(?P<ns>[^/]+)$"), "list"),
    ("PUT", re.compile(r"^/api/v1/workflows/(?P<ns>[^/]+)/(?P<name>[^/]+)/retry$"), "retry"),
]
# grpc codes the Argo Server's gateway puts in its error bodies
_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6}


def unknown_keys(sent, parsed, where: str = "") -> list[str]:
    """Keys of SENT (JSON as received) that the model dump PARSED lacks: fields the schema does not have."""
    if isinstance(sent, dict) and isinstance(parsed, dict):
        out = []
        for key, value in sent.items():
            path = f"{where}.{key}" if where else key
            out += [path] if key not in parsed else unknown_keys(value, parsed[key], path)
        return out
    if isinstance(sent, list) and isinstance(parsed, list) and len(sent) == len(parsed):
        return [k for i, (a, b) in enumerate(zip(sent, parsed)) for k in unknown_keys(a, b, f"{where}[{i}]")]
    return []


def check_schema(model, body) -> str | None:
    """None if BODY is a valid MODEL (a Hera model of the Argo API) with no field the schema lacks, else why not."""
    from pydantic import ValidationError

    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        return f"{model.__name__}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}"
    unknown = unknown_keys(body, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))
    return f'{model.__name__}: unknown field "{unknown[0]}"' if unknown else None


class ArgoAPIServer(ThreadedServer):
    def __init__(self, token: str, *, base: str = "", certfile: str | None = None, keyfile: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.base = base.rstrip("/")
        self.tls = certfile is not None
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.templates: dict[tuple[str, str], dict] = {}
        self.workflows: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.failing: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server_address[1]}{self.base}"

    def fail(self, path_prefix: str, code: int) -> None:
        """Requests under PATH_PREFIX (after BASE) answer CODE (403: RBAC refuses; 409: a conflict)."""
        self.failing[path_prefix] = code


class _Handler(JSONHandler):
    server: ArgoAPIServer

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"code": _GRPC[code], "message": message})

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.server.lock:
            self.server.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": copy.deepcopy(body)})
        if not url.path.startswith(self.server.base + "/api/"):
            # the web UI's page, as the Argo Server serves it for any path outside its API, without a token
            self._send_bytes(200, b"<!doctype html><html><head><title>Argo</title></head><body></body></html>",
                             "text/html")
            return None
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._error(401, "token not valid. see https://argo-workflows.readthedocs.io/en/latest/faq/")
        path = url.path[len(self.server.base):]
        for prefix, code in self.server.failing.items():
            if path.startswith(prefix):
                if code == 403:
                    return self._error(403, 'workflows.argoproj.io is forbidden: User "system:serviceaccount:argo:'
                                            f'sso-alice" cannot {method.lower()} resource "workflows" in API group '
                                            '"argoproj.io" in the namespace "m3tune"')
                return self._error(code, 'Operation cannot be fulfilled on workflows.argoproj.io: the object has '
                                         'been modified; please apply your changes to the latest version and try '
                                         'again')
        for verb, pattern, action in _ROUTES:
            m = pattern.match(path)
            if m and verb == method:
                with self.server.lock:
                    return getattr(self, action)(body, parse_qs(url.query), **m.groupdict())
        return self._error(404, f"Not Found: {method} {path}")

    def get_template(self, body, query, ns, name):
        template = self.server.templates.get((ns, name))
        if template is None:
            return self._error(404, f'workflowtemplates.argoproj.io "{name}" not found')
        return self._send(200, template)

    def create(self, body, query, ns):
        from hera.workflows.models import WorkflowCreateRequest

        if (why := check_schema(WorkflowCreateRequest, body)) is not None:
            return self._error(400, why)
        workflow = body["workflow"]
        meta = workflow.setdefault("metadata", {})
        meta.setdefault("name", meta.get("generateName", "wf-") + uuid.uuid4().hex[:5])
        if (ns, meta["name"]) in self.server.workflows:
            return self._error(409, f'workflows.argoproj.io "{meta["name"]}" already exists')
        meta.update(namespace=ns, uid=str(uuid.uuid4()),
                    creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        workflow["status"] = {}
        self.server.workflows[(ns, meta["name"])] = workflow
        return self._send(200, workflow)

    def list(self, body, query, ns):
        selector = dict(s.split("=", 1) for s in query.get("listOptions.labelSelector", [""])[0].split(",") if s)
        items = [w for (n, _), w in self.server.workflows.items() if n == ns
                 and all(w["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
        # the Argo Server answers null, not [], when nothing matches
        return self._send(200, {"metadata": {"resourceVersion": "1"}, "items": items or None})

    def retry(self, body, query, ns, name):
        from hera.workflows.models import WorkflowRetryRequest

        if (why := check_schema(WorkflowRetryRequest, body)) is not None:
            return self._error(400, why)
        workflow = self.server.workflows.get((ns, name))
        if workflow is None:
            return self._error(404, f'workflows.argoproj.io "{name}" not found')
        phase = workflow.get("status", {}).get("phase", "Pending")
        # as Argo's FormulateRetryWorkflow
        if phase == "Succeeded" and not (body.get("restartSuccessful") and body.get("nodeFieldSelector")):
            return self._error(400, "To retry a succeeded workflow, set the options restartSuccessful and "
                                    "nodeFieldSelector")
        if phase not in ("Failed", "Error", "Succeeded"):
            return self._error(400, f"Cannot retry a workflow in phase {phase}")
        workflow["status"]["phase"] = "Running"
        return self._send(200, workflow)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")
