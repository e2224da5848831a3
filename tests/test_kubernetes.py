"""The Kubernetes manifest (``distripool kubernetes``) and the Helm chart
(``deploy/helm``), rendered and checked for their structure: a Deployment
of workers that mount the key from a Secret, a readiness check, resources
from the flags, and the key nowhere but in the Secret. No Kubernetes
cluster runs here: neither was applied to a live one."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import helm_render
from distripool.deploy import kubernetes_manifest

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "distripool-workers"
KEY = "k3y-" + "x" * 28


def by_kind(docs):
    return {d["kind"]: d for d in docs}


def check_workers(docs, key: str | None, secret_name: str, replicas: int):
    """What every rendering must hold, whichever made it."""
    kinds = by_kind(docs)
    deployment = kinds["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == replicas
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60, "time to drain after SIGTERM"
    (container,) = pod["containers"]
    argv = container["command"] + container["args"]
    assert argv[1:4] == ["-m", "distripool", "worker"]
    assert argv[argv.index("--authkey-file") + 1] == "/var/run/distripool/authkey"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/distripool")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": secret_name, "defaultMode": 0o400}
    ready = container["readinessProbe"]["exec"]["command"]
    assert ready == ["test", "-e", argv[argv.index("--ready-file") + 1]]
    everything_but_the_secret = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    if key is not None:
        secret = kinds["Secret"]
        assert secret["metadata"]["name"] == secret_name
        assert base64.b64decode(secret["data"]["authkey"]).decode() == key
        assert key not in everything_but_the_secret
        assert secret["data"]["authkey"] not in everything_but_the_secret
    else:
        assert "Secret" not in kinds
    for var in container["env"]:
        assert "valueFrom" in var or key is None or key not in var["value"]
    return container


def test_the_manifest_has_a_secret_and_workers_that_mount_it():
    text = kubernetes_manifest(
        "10.0.0.5:1337",
        image="registry.example.com/app:1",
        key=KEY,
        replicas=3,
        processes=4,
        cpu="2",
        memory="4Gi",
        namespace="jobs",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert KEY not in text, "the key appears only base64-encoded, in the Secret"
    docs = list(yaml.safe_load_all(text))
    container = check_workers(docs, KEY, "distripool-workers-key", 3)
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert container["args"][:2] == ["--connect", "10.0.0.5:1337"]
    assert container["args"][container["args"].index("--processes") + 1] == "4"
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]
    assert {d["metadata"]["namespace"] for d in docs} == {"jobs"}


def test_the_cli_prints_the_manifest_with_an_existing_secret(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distripool",
            "kubernetes",
            "--connect",
            "driver.jobs.svc:1337",
            "--existing-secret",
            "shared-key",
            "--image",
            "app:2",
            "--replicas",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    check_workers(docs, None, "shared-key", 5)


def test_the_cli_puts_the_key_file_in_the_secret(tmp_path):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    argv = [
        sys.executable,
        "-m",
        "distripool",
        "kubernetes",
        "--connect",
        "10.1.1.1:1337",
        "--image",
        "app:3",
    ]
    out = subprocess.run([*argv, "--authkey-file", str(key_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    check_workers(list(yaml.safe_load_all(out.stdout)), KEY, "distripool-workers-key", 1)
    neither = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert neither.returncode == 2 and "existing_secret" in neither.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": KEY, "cpu": "two"}, "cpu"),
        ({"key": KEY, "memory": "4 GB"}, "memory"),
        ({"key": KEY, "name": "Workers_1"}, "name"),
        ({"key": KEY, "replicas": -1}, "replicas"),
        ({}, "existing_secret"),
        ({"key": KEY, "existing_secret": "s"}, "existing_secret"),
        ({"key": KEY, "image": "two words"}, "image"),
    ],
)
def test_bad_manifest_arguments_are_refused(kwargs, match):
    kwargs.setdefault("image", "app:1")
    with pytest.raises(ValueError, match=match):
        kubernetes_manifest("10.0.0.5:1337", **kwargs)


def test_the_helm_chart_renders_the_same_structure():
    values = {
        "image": "app:4",
        "connect": ["10.0.0.5:1337", "10.0.0.5:1338"],
        "authkey": KEY,
        "replicas": 2,
        "resources": {"limits": {"cpu": "4", "memory": "8Gi"}},
        "env": [{"name": "A", "value": "b"}],
    }
    docs = helm_render.render(CHART, values, release="workers")
    container = check_workers(docs, KEY, "workers-key", 2)
    assert container["resources"] == {"limits": {"cpu": "4", "memory": "8Gi"}}
    args = container["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--connect"] == ["10.0.0.5:1337", "10.0.0.5:1338"]
    assert "--processes" not in args and "--no-encrypt" not in args


def test_the_helm_chart_with_an_existing_secret_makes_none():
    docs = helm_render.render(
        CHART,
        {"image": "app:4", "connect": ["h:1"], "existingSecret": "shared", "encrypt": False, "processes": 8},
    )
    container = check_workers(docs, None, "shared", 1)
    assert "--no-encrypt" in container["args"]
    assert container["args"][container["args"].index("--processes") + 1] == "8"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"connect": ["h:1"], "authkey": KEY}, "set image"),
        ({"image": "a", "connect": ["h:1"]}, "set authkey"),
    ],
)
def test_the_helm_chart_refuses_missing_values(values, match):
    with pytest.raises(helm_render.RenderError, match=match):
        helm_render.render(CHART, values)


def test_a_key_file_mounted_read_only_for_its_owner_is_accepted(tmp_path):
    from distripool._config import read_key_file

    path = tmp_path / "authkey"
    path.write_text(KEY)
    os.chmod(path, 0o400)
    assert read_key_file(path) == KEY.encode()
