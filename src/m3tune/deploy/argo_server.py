"""Submitting through the Argo Server's HTTP API, for clusters whose users have a bearer token (SSO, a service
account's token) and no kubeconfig.

    submit  the same Workflow as the kubeconfig path (`kube.workflow_body`), from the installed WorkflowTemplate
    runs    the same summary of each m3tune Workflow (`kube.run_info`)
    rerun   Argo's retry of the run's newest Workflow, restarting the step's nodes (and, as Argo does, what
            depends on them). The Argo Server cannot create the Job the kubeconfig path creates, so the options
            only a Job honours are refused (`JOB_ONLY`), never dropped.

The client is Hera's `WorkflowsService`: hera is already the k8s extra's (pinned, it renders the template), its
models are generated from the Argo API's OpenAPI schema, and the `requests` session under it takes a CA bundle
path for `verify`. The `argo-workflows` package would add a second, openapi-generator model set of the same API
(~400 modules) and its own urllib3 configuration for the same three calls.

The token is a credential: it is read from a variable named *_TOKEN or a file, checked before any request
(empty, too short to mask, not one header-safe word), registered with `m3tune.redact` so no message or log shows
it, and sent only in the Authorization header: never in a URL, never quoted in an error.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from m3tune import redact
from m3tune.deploy import kube, validate
from m3tune.deploy.argo import NAME
from m3tune.errors import ConfigError, UserError

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "ARGO_TOKEN"  # what `argo` itself reads
TIMEOUT = 30.0  # seconds per request: Hera sets none, and a server that accepts and never answers would hang
# `m3tune rerun` options that only the single-step Job honours: the Argo Server retries the Workflow as it was
# submitted (its config, image, endpoint, shard count, GPUs), and a retried step skips itself when done.
JOB_ONLY = ("--config", "--image", "--s3-endpoint", "--rank", "--world-size", "--merge-shards", "--gpus", "--force")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # one header-safe word: no space, control or non-ASCII character
_HERA_MESSAGE = re.compile(r"Server returned status code \d+ with message: `(.*)`", re.DOTALL)


class ArgoServerError(UserError):
    """The Argo Server refused a request or could not be reached."""


@dataclass(frozen=True)
class ArgoServer:
    """Where and how to reach an Argo Server: URL (ends with '/'), the token, and `verify` as requests takes it
    (True: the system's CAs; a path: that CA bundle; False: --argo-insecure-skip-verify)."""

    url: str
    token: str = field(repr=False)
    token_source: str
    verify: bool | str

    def service(self, namespace: str):
        from hera.workflows import WorkflowsService

        return WorkflowsService(host=self.url, token=self.token, verify_ssl=self.verify,  # type: ignore[arg-type]
                                namespace=namespace, session=_session(self.token))


def _session(token: str):
    import requests

    def bearer(request):
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    class Session(requests.Session):
        """A timeout on every request, and the last response kept: Hera's errors are built from the response
        and fail on a body that is not the Argo API's, so the error line is built from the response itself."""

        last: requests.Response | None = None

        def request(self, method, url, **kwargs):
            kwargs.setdefault("timeout", TIMEOUT)
            self.last = None
            response = super().request(method, url, **kwargs)
            self.last = response
            return response

    session = Session()
    # The session's own auth (the same header Hera sets): without one, requests would let a ~/.netrc entry for
    # the host replace the token with a password. On a redirect to another host requests drops it.
    session.auth = bearer
    return session


def connect(url: str | None, *, token_env: str | None, token_file: str | None, ca_file: str | None,
            insecure: bool) -> ArgoServer:
    """The Argo Server of these options, every one checked before any request is sent."""
    url = validate.argo_server(url or "")
    tls = url.startswith("https://")
    if ca_file is not None and insecure:
        raise ConfigError("--argo-ca-file and --argo-insecure-skip-verify: give one (a CA to verify the server "
                          "with, or no verification)")
    if (ca_file is not None or insecure) and not tls:
        option = "--argo-ca-file" if ca_file is not None else "--argo-insecure-skip-verify"
        raise ConfigError(f"{option}: the Argo Server URL {url} is http://, there is no TLS to verify; use "
                          "https:// or drop the option")
    if token_file is not None and token_env is not None:
        raise ConfigError("--argo-token-file and --argo-token-env: give one source of the token")
    token, source = _read_token(token_env, token_file)
    verify: bool | str = True
    if ca_file is not None:
        verify = _ca_bundle(ca_file)
    elif insecure:
        verify = False
        log.warning("TLS verification is off (--argo-insecure-skip-verify): any server answering as %s receives "
                    "the token", url)
    return ArgoServer(url=url.rstrip("/") + "/", token=token, token_source=source, verify=verify)


def _read_token(token_env: str | None, token_file: str | None) -> tuple[str, str]:
    if token_file is not None:
        source = f"--argo-token-file {token_file}"
        text = _read_file(token_file, source, "a file holding the token", "utf-8",
                          missing="write the token there (e.g. `argo auth token`)",
                          undecodable="not UTF-8 text; it must hold the token alone")
    else:
        name = redact.check_token_env(token_env or DEFAULT_TOKEN_ENV)
        source = name
        text = os.environ.get(name)
        if text is None:
            raise ConfigError(f"no Argo Server token: {name} is not set; set it (export {name}=$(argo auth token)), "
                              "or give --argo-token-file")
    return _clean_token(text, source), source


def _read_file(path: str, source: str, what: str, encoding: str, *, missing: str = "",
               undecodable: str = "") -> str:
    """The text of PATH (given as SOURCE), or one line saying why it cannot be read. ASCII reads replace what
    is not ASCII (a PEM file's comments may hold anything); a strict encoding's failure says UNDECODABLE."""
    try:
        with open(path, encoding=encoding, errors="replace" if encoding == "ascii" else "strict") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file" + (f"; {missing}" if missing else "")) from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: a folder, not {what}") from None
    except PermissionError:
        raise ConfigError(f"{source}: cannot read it (permission denied); fix its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {undecodable}") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it ({e.strerror})") from None


def _clean_token(text: str, source: str) -> str:
    # `argo auth token` prints "Bearer v2:…"; Hera adds "Bearer " itself, and a second one would be refused
    token = text.strip()
    token = re.sub(r"(?i)^bearer\s+", "", token)
    if not token:
        raise ConfigError(f"{source}: the token is empty; set it to your Argo Server token (argo auth token)")
    redact.register(token)  # from now on masked wherever it could appear, whatever its shape
    if not _TOKEN.fullmatch(token):
        # not quoted: it is a credential, and requests would quote it whole in its own error
        raise ConfigError(f"{source}: the token holds spaces, control or non-ASCII characters; it must be one "
                          "word (the output of `argo auth token`, with or without 'Bearer ')")
    if len(token) < redact.MIN_KEY_CHARS:
        raise ConfigError(f"{source}: a token of {len(token)} character(s) is refused (it could not be masked in "
                          "logs); check it")
    return token


def _ca_bundle(path: str) -> str:
    pem = _read_file(path, f"--argo-ca-file {path}", "a PEM file", "ascii")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"--argo-ca-file {path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    return path


def _call(server: ArgoServer, service, doing: str, ns: str, fn, /, *args, hints: dict[int, str] | None = None,
          **kwargs):
    """FN's answer, or one line naming the server, the HTTP status and what to do."""
    import requests
    from pydantic import ValidationError

    try:
        with warnings.catch_warnings():
            # Hera serialises requests with pydantic's deprecated .json(): nothing the user can act on
            warnings.filterwarnings("ignore", message="The `json` method is deprecated")
            if server.verify is False:  # the user turned verification off on purpose, and was told once
                from urllib3.exceptions import InsecureRequestWarning

                warnings.simplefilter("ignore", InsecureRequestWarning)
            return fn(*args, **kwargs)
    except requests.exceptions.JSONDecodeError:  # a RequestException too, but the server did answer
        raise ArgoServerError(_not_argo(server, doing)) from None
    except requests.exceptions.SSLError as e:
        raise ArgoServerError(f"{doing}: TLS with the Argo Server {server.url} failed ({_reason(e)}); give its CA "
                              "bundle with --argo-ca-file") from None
    except requests.exceptions.RequestException as e:
        raise ArgoServerError(f"{doing}: cannot reach the Argo Server {server.url} ({type(e).__name__}: "
                              f"{_reason(e)})") from None
    except Exception as e:
        response = service.session.last
        if response is None:
            raise
        if response.ok:
            if isinstance(e, (ValueError, ValidationError)):  # JSONDecodeError is a ValueError
                raise ArgoServerError(_not_argo(server, doing)) from None
            raise
        raise _refusal(server, doing, ns, response, e, hints or {}) from None


def _not_argo(server: ArgoServer, doing: str) -> str:
    # the Argo Server answers its web UI's page, 200, for any path outside its API: a URL without the server's
    # base path lands there
    return (f"{doing}: the answer of {server.url} is not the Argo API's; is it the Argo Server's URL, with its "
            "base path (--basehref) if it has one?")


def _reason(e: Exception) -> str:
    # urllib3's reasons nest ("Max retries exceeded … (Caused by SSLError(…))"): the innermost says the most
    text = " ".join(str(e).split())
    inner = re.search(r"Caused by \w+\(([\'\"]?)(.*)\1\)\)?$", text)
    return (inner[2] if inner else text)[:300]


def _refusal(server: ArgoServer, doing: str, namespace: str, response, error: Exception,
             hints: dict[int, str]) -> ArgoServerError:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    if not message:
        found = _HERA_MESSAGE.search(str(error))
        message = found[1] if found else (response.reason or response.text[:200])
    message = " ".join(redact.redact(message).split())  # one line, whatever the server wrote
    code = response.status_code
    hint = {
        401: f"the token was refused; get a new one (argo auth token, or log in again through SSO) and set it in "
             f"{server.token_source}",
        403: f"the token's account may not do this in namespace {namespace!r}; ask for the Argo Server RBAC of "
             "Role m3tune-submitter (manifests/rbac.yaml), or for SSO the RBAC your group maps to",
        404: f"not found in namespace {namespace!r}; is m3tune installed there (helm install … -n {namespace})?",
        409: "it exists already, or changed meanwhile; check with `m3tune runs`, then run the command again",
        **hints,
    }.get(code, "")
    return ArgoServerError(f"{doing} on the Argo Server {server.url}: HTTP {code}: {message}"
                           + (f" — {hint}" if hint else ""))


def _dump(model) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def submit(server: ArgoServer, namespace: str, parameters: dict[str, str], *, template: str = NAME) -> str:
    """Create a Workflow from the installed WorkflowTemplate TEMPLATE; return its name."""
    from hera.workflows.models import Workflow, WorkflowCreateRequest

    kube.check_submission(parameters, template)
    with server.service(namespace) as service:
        installed = _call(server, service, f"reading WorkflowTemplate {template}", namespace,
                          service.get_workflow_template, template, namespace=namespace)
        body = kube.workflow_body(_dump(installed), parameters, template)
        request = WorkflowCreateRequest(workflow=Workflow.model_validate(body))
        created = _call(server, service, "creating the Workflow", namespace, service.create_workflow, request,
                        namespace=namespace)
    return created.metadata.name


def _workflows(server: ArgoServer, service, namespace: str) -> list[dict[str, Any]]:
    listed = _call(server, service, "listing Workflows", namespace, service.list_workflows, namespace=namespace,
                   label_selector=kube.label_selector())
    return kube.newest_first([_dump(w) for w in listed.items or []])  # the server answers "items": null for none


def runs(server: ArgoServer, namespace: str, *, limit: int = 10) -> list[kube.RunInfo]:
    """The most recent m3tune Workflows, newest first, with the phase of each step."""
    validate.count(limit, "--limit", high=1000)
    with server.service(namespace) as service:
        return [kube.run_info(w) for w in _workflows(server, service, namespace)[:limit]]


def refuse_job_options(given: list[str]) -> None:
    """One line for the first option in GIVEN that only a rerun Job honours."""
    for option in JOB_ONLY:
        if option in given:
            raise ConfigError(f"{option}: not with --argo-server: the Argo Server retries the run's Workflow as it "
                              "was submitted, and a step skips itself when done; for this option rerun the step as "
                              "a Job through the Kubernetes API (drop --argo-server, use --kubeconfig)")


def _parameter(workflow: dict[str, Any], name: str) -> str | None:
    """The value of workflow parameter NAME: the Workflow's own, else the template's default."""
    for spec in (workflow.get("spec", {}), workflow.get("status", {}).get("storedWorkflowTemplateSpec", {})):
        for p in spec.get("arguments", {}).get("parameters", []):
            if p.get("name") == name and "value" in p:
                return p["value"]
    return None


def step_selector(step, workflow: dict[str, Any]) -> str:
    """Argo's node field selector of STEP's final task in WORKFLOW (`argo.py`: a shardable step's merge, a
    distributed step's single pod or, with `STEP-nodes` > 1, its multi-node task)."""
    template = step.name
    if step.distributed and (_parameter(workflow, f"{step.name}-nodes") or "1") != "1":
        template = f"{step.name}-multinode"
    return f"templateName={template}"


def rerun(server: ArgoServer, namespace: str, step_name: str, root: str) -> str:
    """Retry the newest m3tune Workflow of the run at ROOT, restarting STEP; return the Workflow's name."""
    from hera.workflows.models import WorkflowRetryRequest

    from m3tune.pipeline import get_step

    step = get_step(step_name)
    validate.run_root(root)
    with server.service(namespace) as service:
        mine = [w for w in _workflows(server, service, namespace) if _parameter(w, "root") == root]
        if not mine:
            raise ArgoServerError(f"no m3tune Workflow of the run {root} in namespace {namespace!r} on the Argo "
                                  f"Server {server.url}; `m3tune runs` lists them; submit one with m3tune submit "
                                  f"-p root={root}")
        workflow = mine[0]
        name = workflow["metadata"]["name"]
        request = WorkflowRetryRequest(name=name, namespace=namespace, restart_successful=True,
                                       node_field_selector=step_selector(step, workflow))
        _call(server, service, f"retrying Workflow {name} from step {step.name}", namespace, service.retry_workflow,
              name, request, namespace=namespace,
              hints={400: "Argo retries a Workflow once it has finished; wait for it (m3tune runs)",
                     404: "the Workflow is gone (deleted or archived); submit the run again"})
    return name
