"""deploy/nginx.conf's rendering, deploy/k8s.yaml against the Kubernetes API schemas, and the wiring
between its objects and the images (Dockerfile, Dockerfile.cuda): ports, probes, selectors, entry
points."""
from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from balancer import SNIPPET, render
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError
from server_process import REPO_ROOT

K8S_VERSION = "1.30.0"
PORT = 8000


def _documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s.yaml").read_text()))


def _one(kind: str) -> dict[str, Any]:
    [doc] = [d for d in _documents() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: d["kind"])
def test_k8s_objects_match_the_api_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on unknown or mistyped fields


def test_k8s_probes_ports_and_selectors_agree() -> None:
    deployment, service = _one("Deployment"), _one("Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}
    model = next(e["value"] for e in container["env"] if e["name"] == "NANOQWEN_MODEL")
    assert any(model.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])
    # The pod's user owns the image's home (the compiled-kernel and Hub caches live there).
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid} nanoqwen" in (REPO_ROOT / "Dockerfile.cuda").read_text()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_serve_on_the_probed_port_with_a_healthcheck(name: str) -> None:
    text = (REPO_ROOT / name).read_text()
    assert f'ENTRYPOINT ["nanoqwen", "serve", "--host", "0.0.0.0", "--port", "{PORT}"]' in text
    assert f"EXPOSE {PORT}" in text
    assert re.search(rf"HEALTHCHECK .*\n.*http://127\.0\.0\.1:{PORT}/health", text)
    # Everything `pip install .` needs is copied in.
    copied = {path for line in re.findall(r"^COPY (.*) \S+$", text, re.M) for path in line.split()}
    packages = re.search(r"include =\n((?:    .*\n)+)", (REPO_ROOT / "setup.cfg").read_text()).group(1).split()
    assert {"pyproject.toml", "setup.cfg", "README.md", "server.py"} | {p for p in packages if "*" not in p
                                                                          and "." not in p} <= copied


def test_nginx_config_renders_the_replicas_into_both_upstreams() -> None:
    text = render(SNIPPET.read_text(), ["127.0.0.1:9001", "127.0.0.1:9002"], 9000)
    for upstream in ("nanoqwen", "nanoqwen_affinity"):
        block = re.search(rf"upstream {upstream} \{{\n(.*?)\n\}}", text, re.S).group(1)
        # never marked down: nginx counts a replica's 503 queue_full as a failure (test_nginx.py)
        assert re.findall(r"server (\S+) max_fails=0;", block) == [
            "127.0.0.1:9001", "127.0.0.1:9002"]
    assert "listen 127.0.0.1:9000;" in text and "10.0.0." not in text


def test_nginx_refuses_a_body_past_the_replicas_limit_as_they_do() -> None:
    """nginx's client_max_body_size and its 413 body are the replicas' own limit and answer (app.py's 413)."""
    text = SNIPPET.read_text()
    limit = ServerConfig().max_body_bytes
    assert re.search(r"client_max_body_size (\d+)m;", text).group(1) == str(limit >> 20)
    body = re.search(r"return 413 '(.*)';", text).group(1)
    expected = APIError(413, f"The request body is too large (limit {limit} bytes)", code="request_too_large")
    assert json.loads(body) == expected.body()
