"""Workers on Kubernetes: a manifest (a Secret holding the key, and a
Deployment of workers that mount it) for ``kubectl apply``. distripool
does not talk to the cluster: it writes what an operator applies."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._config import normalize_addresses, resolve_cluster
from ._cluster import check_env

KEY_DIR = "/var/run/distripool"
READY_FILE = "/tmp/distripool-ready"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{what} must be a Kubernetes name (lower-case letters, digits and '-', at most 53), not {value!r}"
        )
    return value


def _check_quantity(what: str, value) -> str | None:
    if value is None:
        return None
    text = str(value)
    if isinstance(value, bool) or not _QUANTITY.fullmatch(text):
        raise ValueError(f"{what} must be a Kubernetes quantity like '2', '500m' or '4Gi', not {value!r}")
    return text


def kubernetes_manifest(
    connect: str | Sequence[str],
    *,
    image: str,
    key: bytes | str | None = None,
    existing_secret: str | None = None,
    replicas: int = 1,
    processes: int | None = None,
    cpu: str | int | None = None,
    memory: str | None = None,
    name: str = "distripool-workers",
    namespace: str | None = None,
    cluster: str | None = None,
    python: str = "python",
    encrypt: bool = True,
    env: Mapping[str, str] | None = None,
) -> str:
    """The YAML of a Deployment of ``replicas`` workers that dial ``connect``,
    in containers of ``image`` (which has distripool installed), and of the
    Secret that holds ``key`` (or use ``existing_secret``, which has it under
    ``authkey``). The key is only in the Secret: the workers read it from a
    file mounted from it (mode 0400), never from their command line or
    environment. ``cpu`` and ``memory`` become the container's requests and
    limits; each worker runs ``processes`` executors (default: what its CPU
    limit allows); ``env`` are variables for them. A readiness check passes while the worker is connected,
    and pods get 10 minutes after SIGTERM to finish the tasks they hold.

    Raises:
        ValueError: a bad name, address, quantity or count, or neither or
            both of ``key`` and ``existing_secret``.
    """
    addrs = normalize_addresses(connect)
    _check_name("name", name)
    if namespace is not None:
        _check_name("namespace", namespace)
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        raise ValueError(f"image must name a container image, not {image!r}")
    if (key is None) == (existing_secret is None):
        raise ValueError(
            "give the key (key=, or --authkey-file) or the name of a Secret that has it (existing_secret=)"
        )
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas must be an int of at least 0, not {replicas!r}")
    if processes is not None and (
        isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
    ):
        raise ValueError(f"processes must be an int of at least 1, not {processes!r}")
    cpu, memory = _check_quantity("cpu", cpu), _check_quantity("memory", memory)
    secret = existing_secret if existing_secret is not None else f"{name}-key"
    _check_name("existing_secret", secret)
    labels = {"app.kubernetes.io/name": "distripool-worker", "app.kubernetes.io/instance": name}
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    args = []
    for a in addrs:
        args += ["--connect", a]
    args += ["--authkey-file", f"{KEY_DIR}/authkey", "--cluster", resolve_cluster(cluster)]
    args += ["--ready-file", READY_FILE]
    args += ["--label", "kubernetes_pod=$(POD_NAME)", "--label", "kubernetes_node=$(NODE_NAME)"]
    if processes is not None:
        args += ["--processes", str(processes)]
    if not encrypt:
        args.append("--no-encrypt")
    resources = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "command": [python, "-m", "distripool", "worker"],
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            *({"name": k, "value": v} for k, v in check_env(env).items()),
        ],
        "readinessProbe": {"exec": {"command": ["test", "-e", READY_FILE]}, "periodSeconds": 5},
        "volumeMounts": [{"name": "authkey", "mountPath": KEY_DIR, "readOnly": True}],
    }
    if resources:
        container["resources"] = {"requests": resources, "limits": resources}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 600,
                    "containers": [container],
                    "volumes": [{"name": "authkey", "secret": {"secretName": secret, "defaultMode": 0o400}}],
                },
            },
        },
    }
    docs = []
    if key is not None:
        raw = key.encode() if isinstance(key, str) else bytes(key)
        if not raw:
            raise ValueError("the key is empty")
        smeta = dict(meta, name=secret)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": smeta,
                "type": "Opaque",
                "data": {"authkey": base64.b64encode(raw).decode()},
            }
        )
    docs.append(deployment)
    return "".join("---\n" + "\n".join(to_yaml(d)) + "\n" for d in docs)


def to_yaml(obj, indent: int = 0) -> list[str]:
    """Block-style YAML lines of plain data; strings are double-quoted
    (JSON's escapes, which YAML reads the same)."""
    pad = " " * indent
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            key = k if re.fullmatch(r"[A-Za-z0-9_./-]+", k) else json.dumps(k)
            if isinstance(v, (Mapping, list)) and v:
                out.append(f"{pad}{key}:")
                out += to_yaml(v, indent + 2)
            else:
                out.append(f"{pad}{key}: {_scalar(v)}")
        return out
    if isinstance(obj, list):
        out = []
        for v in obj:
            if isinstance(v, (Mapping, list)) and v:
                inner = to_yaml(v, indent + 2)
                out.append(f"{pad}- {inner[0].lstrip()}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_scalar(v)}")
        return out
    return [pad + _scalar(obj)]


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Mapping):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return json.dumps(str(v))
