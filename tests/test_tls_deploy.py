"""TLS in the deployment files: the Kubernetes TLS overlays, the compose TLS file, the probe."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import headers, make_settings, serve_citadel
from test_kubernetes import K8S_VERSIONS, KUBE, Doc, container, env, one, render
from tls_support import Authority, serve_tls, tls_settings

from citadel.config import secret_file_problem
from citadel.healthcheck import probe

ROOT = Path(__file__).resolve().parent.parent
TLS_OVERLAYS = ["local-tls", "evervault-tls"]


@pytest.fixture(scope="module", params=TLS_OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc], list[Doc]]:
    name: str = request.param
    return name, render(KUBE / "overlays" / name), render(KUBE / "overlays" / name[:-4])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_tls_overlays_fit_the_kubernetes_schema(
    overlay: tuple[str, list[Doc], list[Doc]], version: str
) -> None:
    for doc in overlay[1]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_tls_overlays_serve_the_certificate_of_the_tls_secret(
    overlay: tuple[str, list[Doc], list[Doc]],
) -> None:
    _, docs, _ = overlay
    e = env(docs)
    assert e["CITADEL_TLS_CERT_FILE"] == "/etc/citadel/tls/tls.crt"
    assert e["CITADEL_TLS_KEY_FILE"] == "/etc/citadel/tls/tls.key"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "citadel-tls"
    # The kubelet adds group read with the fsGroup; the key file passes the production rule.
    uid = container(docs)["securityContext"]["runAsUser"]
    assert secret_file_problem(volume["secret"]["defaultMode"] | 0o440, 0, euid=uid) is None
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "tls"]
    # A directory, never a subPath: a renewed certificate reaches the pod without a restart.
    assert mount == {"name": "tls", "mountPath": "/etc/citadel/tls", "readOnly": True}


def test_tls_overlays_probe_over_https_on_the_same_paths(
    overlay: tuple[str, list[Doc], list[Doc]],
) -> None:
    _, docs, _ = overlay
    c = container(docs)
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http", "scheme": "HTTPS"}
    assert c["startupProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_tls_overlays_change_nothing_else(overlay: tuple[str, list[Doc], list[Doc]]) -> None:
    """The NetworkPolicy, the Service and every other setting are the plain overlay's."""
    _, docs, plain = overlay
    assert one(docs, "NetworkPolicy") == one(plain, "NetworkPolicy")
    assert one(docs, "Service") == one(plain, "Service")
    deployment = copy.deepcopy(one(docs, "Deployment"))
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tls"]
    (c,) = spec["containers"]
    c["env"] = [e for e in c["env"] if not e["name"].startswith("CITADEL_TLS_")]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "tls"]
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        del c[name]["httpGet"]["scheme"]
    assert deployment == one(plain, "Deployment")


def test_the_two_tls_patches_are_the_same() -> None:
    local, evervault = (
        (KUBE / "overlays" / name / "deployment.yaml").read_text() for name in TLS_OVERLAYS
    )
    assert local == evervault


def test_the_compose_tls_file_mounts_a_directory_and_names_the_files() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    citadel = doc["services"]["citadel"]
    assert citadel["environment"] == {
        "CITADEL_TLS_CERT_FILE": "/etc/citadel/tls/tls.crt",
        "CITADEL_TLS_KEY_FILE": "/etc/citadel/tls/tls.key",
    }
    assert citadel["volumes"] == ["${CITADEL_TLS_DIR:-./tls}:/etc/citadel/tls:ro"]


@pytest.mark.parametrize("name", ["docker-compose.local.yml", "docker-compose.evervault.yml"])
def test_compose_healthchecks_speak_what_the_listener_speaks(name: str) -> None:
    doc = yaml.safe_load((ROOT / name).read_text())
    test = doc["services"]["citadel"]["healthcheck"]["test"]
    assert test == ["CMD", "python", "-m", "citadel.healthcheck", "8004", "/health"]
    assert (
        'CMD ["python", "-m", "citadel.healthcheck", "8004", "/health"]'
        in (ROOT / "Dockerfile").read_text()
    )


# -- the probe itself ---------------------------------------------------------------------------


def test_the_probe_speaks_plain_http_without_tls(tmp_path: Path) -> None:
    with serve_citadel(make_settings(tmp_path)) as served:
        port = int(served.url.rsplit(":", 1)[1])
        assert probe(port, {})
        assert not probe(port, {"CITADEL_TLS_CERT_FILE": "/etc/citadel/tls/tls.crt"})


def test_the_probe_speaks_tls_and_presents_a_client_certificate_under_mtls(
    tmp_path: Path,
) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca.crt")
    cert, key = ca.client("probe").write(tmp_path, "probe")
    settings = tls_settings(tmp_path, ca, mutual=True)
    with serve_tls(settings) as served:
        server_env = {"CITADEL_TLS_CERT_FILE": str(settings.tls_cert_file)}
        assert not probe(served.port, server_env)  # no client certificate: refused
        with_cert = {
            **server_env,
            "CITADEL_CLIENT_CERT_FILE": str(cert),
            "CITADEL_CLIENT_KEY_FILE": str(key),
        }
        assert probe(served.port, with_cert)
        assert probe(served.port, {**with_cert, "CITADEL_CA_FILE": str(ca_file)})
        other_ca = Authority.make("other").write(tmp_path / "other.crt")
        assert not probe(served.port, {**with_cert, "CITADEL_CA_FILE": str(other_ca)})


# -- the README's recipe ------------------------------------------------------------------------


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("```", start)]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_readme_openssl_recipe_makes_files_citadel_serves_and_binds(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _readme_block("#### A development CA and certificates")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    tls = tmp_path / "tls"
    identities = {c: f"spiffe://cluster.local/ns/trading/sa/{c}" for c in ("sentinel", "conductor")}
    settings = make_settings(
        tmp_path,
        tls_cert_file=tls / "tls.crt",
        tls_key_file=tls / "tls.key",
        tls_client_ca_file=tls / "ca.crt",
        tls_caller_identities=identities,
    )
    with serve_tls(settings) as served:
        for cert_of, status in (("sentinel", 200), ("conductor", 401)):
            client_cert = (tls / f"{cert_of}.crt", tls / f"{cert_of}.key")
            with served.client(tls / "ca.crt", client_cert) as c:
                r = c.post("/encrypt", json={"plaintext": "hello"}, headers=headers("sentinel"))
                assert r.status_code == status, cert_of
