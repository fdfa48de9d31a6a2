"""The rules every value bound for a Kubernetes object or an Argo Workflow must pass, in one place.

`m3tune render job`, `m3tune rerun` and `m3tune submit` check what they are given here, before anything is
rendered or any request is sent: a value the API server, Argo's templating, the kubelet's `$(VAR)`
expansion or a step's argument parser would take differently than the user meant is refused with one line
naming the option and the rule, not discovered later in a pod (or never). The rendered WorkflowTemplate's
own defaults pass the same rules (`argo.render_workflow_template`), so the table below and the
template cannot drift apart.

Every check raises ConfigError (exit 1). A message quotes the refused value except where it may hold a
credential (a URI's user part): then it says where the credential goes instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from m3tune.errors import ConfigError

# Upper bounds of counts: above what any cluster this pipeline targets has, so a typo (-p
# mine-negatives-shards=4000, --gpus 80) is refused instead of creating thousands of pods or a pod that
# never schedules.
MAX_GPUS = 16  # nvidia.com/gpu of one node (8 on HGX boards; 16 leaves room)
MAX_SHARDS = 1024
MAX_NODES = 256
MAX_DEADLINE = 30 * 24 * 3600  # seconds: a month

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
# A path segment of a run root: S3 keys may hold almost anything, but the root is pasted into container
# arguments (where the kubelet expands `$(VAR)`), into Argo parameters (where `{{…}}` is a tag) and into
# logs; letters, digits and `._=-` cover every real prefix (`runs`, `team-a`, `date=2025-01-02`).
_ROOT_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
_BUCKET = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")  # S3's bucket alphabet (AWS also wants 3 or more)
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*")
_URL_PATH = re.compile(r"[/A-Za-z0-9._~-]*")
_REGION = re.compile(r"[a-z0-9][-a-z0-9]{0,31}")
# An image reference, as the container runtimes parse it (github.com/distribution/reference):
# [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST], path components lowercase.
# A first component is a registry only with a '.' or a port, or as localhost (else it is a path component, and
# lowercase: `M3TUNE/x` is refused rather than pulled from a host named M3TUNE).
_HOSTPART = r"[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?"
_DOMAIN = rf"(?:(?:localhost|{_HOSTPART}(?:\.{_HOSTPART})+)(?::[0-9]+)?|{_HOSTPART}:[0-9]+)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
# A Kubernetes quantity, positive: 500m, 8, 1.5, 64Gi, 1e3.
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE]\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
# What Argo (`{{…}}`) or the kubelet (`$(VAR)`) would substitute in a value, and any control character
# (a newline ends a YAML scalar or an argument where a reader does not expect it).
_INTERPRETED = re.compile(r"\{\{|\$\(|[\x00-\x1f\x7f]")


def _bad(option: str, value: str, rule: str) -> ConfigError:
    return ConfigError(f"{option} {value!r}: {rule}")


def no_substitution(value: str, option: str) -> str:
    """VALUE if neither Argo nor the kubelet would substitute anything in it, and it holds no control character."""
    if _INTERPRETED.search(value):
        raise _bad(option, value, "no '{{', '$(' or control characters (Argo and the kubelet would substitute them)")
    return value


def dns_label(value: str, option: str, what: str = "a DNS-1123 label") -> str:
    """A namespace (and any name that is one path segment of the API): 1-63 of a-z, 0-9, '-', alphanumeric ends."""
    if not _DNS_LABEL.fullmatch(value):
        raise _bad(option, value, f"{what}: 1-63 lowercase letters, digits or '-', starting and ending with a "
                                  "letter or digit")
    return value


def namespace(value: str, option: str = "--namespace") -> str:
    return dns_label(value, option, "a namespace must be a DNS-1123 label")


def dns_subdomain(value: str, option: str) -> str:
    """A Secret's, a WorkflowTemplate's name: dot-separated DNS-1123 labels, 253 characters at most."""
    if not _DNS_SUBDOMAIN.fullmatch(value):
        raise _bad(option, value, "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', 253 at most")
    return value


def config_key(value: str, option: str = "--config") -> str:
    """CONFIG names a key of the mounted ConfigMap; a path (../..) would have the pod read outside the mount
    (`../../../proc/self/environ`: its own environment, credentials included)."""
    if not _CONFIG_KEY.fullmatch(value) or value in (".", ".."):
        raise _bad(option, value, "a key of the m3tune-config ConfigMap (a file name such as run.yaml), not a path")
    return value


def _has_userinfo(value: str) -> bool:
    """Whether the URI VALUE has a USER[:PASSWORD]@ part (looked for before any parsing that could quote it)."""
    return "://" in value and "@" in value.partition("://")[2].partition("/")[0]


def _credentials(option: str) -> ConfigError:
    # the value is not quoted: it holds a credential
    return ConfigError(f"{option}: a user or password in the URI (USER:PASSWORD@) is refused: it would be "
                       "rendered in clear; credentials go in the Secret m3tune-s3 (AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY)")


def run_root(value: str, option: str = "--root") -> str:
    """The run id of a pod's run root s3://BUCKET/PREFIX/RUN_ID: no credentials, no part that Argo, the kubelet
    or a shell would interpret, no segment naming another key ('//', '.', '..'), no query."""
    if _has_userinfo(value):
        raise _credentials(option)
    if not value.startswith("s3://"):
        raise _bad(option, value, "a pod can only reach a run on S3 (s3://BUCKET/PREFIX/RUN_ID)")
    netloc, _, path = value[len("s3://"):].partition("/")
    no_substitution(value, option)
    if not _BUCKET.fullmatch(netloc):
        raise _bad(option, value, "the bucket is 1-63 lowercase letters, digits, '.' or '-' "
                                  "(s3://BUCKET/PREFIX/RUN_ID)")
    segments = path.removesuffix("/").split("/")
    if len(segments) < 2 or not all(_ROOT_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise _bad(option, value, "expected s3://BUCKET/PREFIX/RUN_ID, each segment of letters, digits, '.', '_', "
                                  "'=' or '-' (no '//', '.', '..', '?', spaces or shell characters)")
    run_id = segments[-1]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_id):
        raise _bad(option, value, f"invalid run id {run_id!r}: 1-128 letters, digits, '.', '_' or '-', starting "
                                  "with a letter or digit")
    return run_id


def _http_url(value: str, option: str) -> str:
    """VALUE, an http(s)://HOST[:PORT][/PATH] URL without credentials (checked first), query or fragment."""
    try:
        url = urlsplit(value)
        port = url.port  # ValueError when out of range
    except ValueError:
        url, port = None, None
    no_substitution(value, option)
    if (url is None or url.scheme not in ("http", "https") or not _HOST.fullmatch(url.hostname or "")
            or port == 0 or url.query or url.fragment or "?" in value or "#" in value
            or not _URL_PATH.fullmatch(url.path)):
        raise _bad(option, value, "an http:// or https:// URL (HOST[:PORT][/PATH]), without query or fragment")
    return value


def s3_endpoint(value: str, option: str = "--s3-endpoint") -> str:
    """An S3 endpoint: empty (AWS), or http(s)://HOST[:PORT][/PATH], without credentials, query or fragment."""
    if not value:
        return value
    if _has_userinfo(value):
        raise _credentials(option)
    return _http_url(value, option)


def argo_server(value: str, option: str = "--argo-server") -> str:
    """The Argo Server's URL, https://HOST[:PORT][/BASEHREF]: with its scheme (a bare host:port, as the argo CLI's
    ARGO_SERVER holds, would be read as a path), without credentials (the token goes in a header, never in a URL,
    where proxies and logs keep it), query or fragment."""
    # not quoted: it holds a credential (user:token@host:2746 too, without a scheme)
    if _has_userinfo(value) or ("://" not in value and "@" in value.partition("/")[0]):
        raise ConfigError(f"{option}: a user or password in the URL (USER:PASSWORD@) is refused; the token goes in "
                          "ARGO_TOKEN or --argo-token-file")
    if not value:
        raise ConfigError(f"{option}: empty; give the Argo Server's URL, e.g. https://argo.example.com:2746")
    if "://" not in value:
        raise _bad(option, value, "no scheme; give https://HOST[:PORT] (or http:// for a server without TLS)")
    return _http_url(value, option)


def image(value: str, option: str = "--image") -> str:
    """A container image reference ([REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]): nothing a runtime would
    refuse at pull time, nothing a shell or Argo would interpret."""
    match = _IMAGE.fullmatch(value)
    if not match or len(match["name"]) > 255:
        raise _bad(option, value, "an image reference [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST], path in "
                                  "lowercase")
    return value


def count(value: int | str, option: str, *, high: int, low: int = 1) -> int:
    """An integer in [LOW, HIGH] (a resource count, a number of shards or nodes, seconds)."""
    try:
        number = int(value) if isinstance(value, int) or re.fullmatch(r"-?\d+", value) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise _bad(option, str(value), f"an integer from {low} to {high}")
    return number


def quantity(value: str, option: str) -> str:
    """A positive Kubernetes quantity (500m, 8, 64Gi)."""
    match = _QUANTITY.fullmatch(value)
    if not match or float(match[1]) <= 0:
        raise _bad(option, value, "a positive Kubernetes quantity such as 500m, 8 or 64Gi")
    return value


def shard(rank: int | None, world_size: int | None, merge_shards: int | None) -> None:
    """--rank R --world-size N: 0 <= R < N; --merge-shards N: N >= 1, alone (a pod given both merges and
    ignores the rank; 0 would have it withdraw the step's manifest and then fail)."""
    if (rank is None) != (world_size is None):
        raise ConfigError("--rank and --world-size go together")
    if merge_shards is not None:
        if rank is not None:
            raise ConfigError("--merge-shards: give either --merge-shards N or --rank R --world-size N, not both")
        count(merge_shards, "--merge-shards", high=MAX_SHARDS)
    if world_size is not None:
        count(world_size, "--world-size", high=MAX_SHARDS)
        if not 0 <= rank < world_size:
            raise _bad("--rank", str(rank), f"a rank from 0 to {world_size - 1} (--world-size {world_size})")


def label_value(value: str, option: str, label: str) -> str:
    if not _LABEL_VALUE.fullmatch(value):
        raise _bad(option, value, f"cannot be the label {label}: a label value is at most 63 letters, digits, "
                                  "'-', '_' or '.', starting and ending with a letter or digit")
    return value


def check_labels(obj: Any, where: str = "") -> None:
    """Every `labels` mapping in OBJ (metadata, pod templates): keys [PREFIX/]NAME, values label values."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            check_labels(item, f"{where}[{i}]")
        return
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        if key == "labels" and isinstance(value, dict):
            for name, text in value.items():
                prefix, _, short = name.rpartition("/")
                if not _LABEL_NAME.fullmatch(short) or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix)):
                    raise ConfigError(f"label key {name!r} ({where or 'object'}): [DNS-1123 PREFIX/]NAME, NAME at "
                                      "most 63 letters, digits, '-', '_' or '.'")
                label_value(str(text), f"label {name} ({where or 'object'})", name)
        else:
            check_labels(value, f"{where}.{key}" if where else key)


# --- Workflow parameters ----------------------------------------------------------------------------------------

Rule = Callable[[str, str], Any]  # (value, option) -> anything; raises ConfigError


def _json(kind: type, what: str) -> Rule:
    def rule(value: str, option: str) -> None:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, kind):
            raise _bad(option, value, f"JSON: {what}")
        if kind is dict and not all(isinstance(v, str) for v in parsed.values()):
            raise _bad(option, value, f"JSON: {what}")
        if kind is list and not all(isinstance(v, dict) for v in parsed):
            raise _bad(option, value, f"JSON: {what}")
    return rule


def _boolean(value: str, option: str) -> None:
    if value not in ("true", "false"):
        raise _bad(option, value, "true or false")


def region(value: str, option: str) -> str:
    if not _REGION.fullmatch(value):
        raise _bad(option, value, "a region name such as us-east-1 (lowercase letters, digits, '-')")
    return value


def _counted(high: int) -> Rule:
    return lambda value, option: count(value, option, high=high)


def parameter_rules(steps: dict[str, Any]) -> dict[str, Rule]:
    """The rule of each parameter of the WorkflowTemplate rendered from STEPS (by name, as `argo.parameters`)."""
    rules: dict[str, Rule] = {
        "root": run_root, "config": config_key, "s3-endpoint": s3_endpoint, "aws-region": region,
        "s3-secret": dns_subdomain, "llm-secret": dns_subdomain, "qdrant-secret": dns_subdomain,
        "image-cpu": image, "image-gpu": image,
        "cpu": quantity, "memory": quantity, "cache-size": quantity, "tmp-size": quantity,
        "gpu-cpu": quantity, "gpu-memory": quantity, "shm-size": quantity, "gpu-cache-size": quantity,
        "deadline": _counted(MAX_DEADLINE), "gpu-deadline": _counted(MAX_DEADLINE),
        "gpus-per-node": _counted(MAX_GPUS),
        "gpu-node-selector": _json(dict, "an object of strings, such as {\"gpu\": \"h100\"}"),
        "gpu-tolerations": _json(list, "a list of tolerations (objects)"),
    }
    for step in steps.values():
        if step.shardable:
            rules[f"{step.name}-shards"] = _counted(MAX_SHARDS)
        if step.distributed:
            rules[f"{step.name}-nodes"] = _counted(MAX_NODES)
        if step.optional:
            rules[step.name] = _boolean
    return rules


def check_parameters(parameters: dict[str, str], steps: dict[str, Any] | None = None) -> None:
    """Each parameter's value by its rule; every value (a custom template's own parameters too) free of what Argo
    or the kubelet would substitute."""
    if steps is None:
        from m3tune.pipeline import STEPS as steps
    rules = parameter_rules(steps)
    for name, value in parameters.items():
        option = f"-p {name}"
        rule = rules.get(name)
        if rule is not None:  # first: its message is the more precise (and a root's hides credentials)
            rule(value, option)
        no_substitution(value, option)
