"""The Kubernetes manifests (deploy/kubernetes), rendered as an operator applies them.

Each overlay is rendered the way ``kubectl apply -k`` does, validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown or misspelt
field fails), and checked for what an operator relies on, so that a later edit
cannot drop a probe, a security setting or a network rule silently.

Rendering: ``render()`` below is a small kustomize for the subset the overlays
use (resources, and strategic-merge patches given by path). Where kubectl is
installed, a test checks that it renders exactly what ``kubectl kustomize``
does, so the two cannot drift apart; the other tests run without kubectl.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from citadel.config import secret_file_problem

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["local", "evervault"]
# The oldest Kubernetes release still commonly run, and the newest the schemas know.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
PRIVATE_V4 = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}

Doc = dict[str, Any]

# Strategic-merge keys of the lists the overlays patch (Kubernetes' own
# patchMergeKey for these fields); any other list is replaced by the patch's.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Kubernetes' strategic merge patch, for maps and the lists in MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    key = MERGE_KEYS.get(field or "")
    if key and isinstance(base, list) and isinstance(patch, list):
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, b in enumerate(merged_list) if b.get(key) == item[key]), None)
            if match is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[match] = strategic_merge(merged_list[match], item)
        return merged_list
    return copy.deepcopy(patch)


def render(directory: Path) -> list[Doc]:
    """``kustomize build`` for kustomizations with only ``resources`` and ``patches: - path:``."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{directory}: render() does not implement {sorted(unknown)}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only `patches: - path:` is implemented"
        for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
            ident = (patch["kind"], patch["metadata"]["name"])
            index = next(
                i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == ident
            )
            docs[index] = strategic_merge(docs[index], patch)
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(KUBE / "overlays" / request.param)


def one(docs: list[Doc], kind: str, name: str = "citadel") -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def container(docs: list[Doc]) -> Doc:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(docs: list[Doc]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


# --- rendering and schemas ----------------------------------------------------------


def canonical(docs: list[Doc]) -> dict[tuple[str, str], Any]:
    """Documents by kind and name, merge-keyed lists sorted (their order means nothing)."""

    def sort(value: Any, field: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: sort(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [sort(v) for v in value]
            key = MERGE_KEYS.get(field or "")
            return sorted(items, key=lambda i: str(i.get(key))) if key else items
        return value

    return {(d["kind"], d["metadata"]["name"]): sort(d) for d in docs}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", OVERLAYS)
def test_render_is_what_kubectl_kustomize_renders(name: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / "overlays" / name)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert canonical(render(KUBE / "overlays" / name)) == canonical(
        [d for d in yaml.safe_load_all(out) if d]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_fits_the_kubernetes_schema(
    overlay: tuple[str, list[Doc]], version: str
) -> None:
    _, docs = overlay
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    docs = render(KUBE / "overlays" / "local")
    bad = copy.deepcopy(one(docs, "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_render_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: citadel}]\n")
    with pytest.raises(AssertionError, match="images"):
        render(tmp_path)


# --- what an operator relies on -----------------------------------------------------


def test_at_least_two_replicas_a_budget_and_an_autoscaler(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] >= 1
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "citadel",
    }
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    service = one(docs, "Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(8004, "http")]


def test_probes_liveness_on_health_readiness_on_ready(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    c = container(docs)
    assert c["ports"] == [{"name": "http", "containerPort": 8004, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    # uvicorn's graceful shutdown (10 s) and the preStop pause fit in the grace period.
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 10 + int(
        c["lifecycle"]["preStop"]["exec"]["command"][1]
    )


def test_restrictive_security_context(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert (sc["runAsUser"], sc["runAsGroup"]) == (10001, 10001)
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_requests_and_limits(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    resources = container(docs)["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}


def test_secrets_are_directories_never_subpath_and_tmp_is_the_only_writable_place(
    overlay: tuple[str, list[Doc]],
) -> None:
    name, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert set(mounts) == set(volumes)
    for mount in mounts.values():
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
    secret_dirs = {}
    for vname, volume in volumes.items():
        if "secret" in volume:
            assert mounts[vname]["readOnly"] is True
            # readable by the group (fsGroup 10001), by no one else
            assert volume["secret"]["defaultMode"] == 0o440
            secret_dirs[volume["secret"]["secretName"]] = mounts[vname]["mountPath"]
        else:
            assert volume == {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
            assert mounts[vname]["mountPath"] == "/tmp"
    e = env(docs)
    assert Path(e["CITADEL_API_KEYS_FILE"]).parent == Path(secret_dirs["citadel-api-keys"])
    if name == "local":
        assert Path(e["CITADEL_LOCAL_KEYRING"]).parent == Path(secret_dirs["citadel-keyring"])
    else:
        assert "citadel-keyring" not in secret_dirs


def test_secret_files_pass_citadels_mode_rule_and_are_readable_by_the_pod(
    overlay: tuple[str, list[Doc]],
) -> None:
    # The kubelet writes a Secret's files owned by root, with defaultMode, and
    # with an fsGroup gives them that group and adds group read (0440) to them.
    # Citadel in production refuses a key file that others can use or that its
    # group can change (citadel.config.secret_file_problem): these must pass.
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    uid = container(docs)["securityContext"]["runAsUser"]
    fs_group = pod["securityContext"].get("fsGroup")
    for volume in pod["volumes"]:
        if "secret" not in volume:
            continue
        mode = volume["secret"].get("defaultMode", 0o644)
        if fs_group is not None:
            mode |= 0o440
        assert secret_file_problem(mode, 0, euid=uid) is None, (volume["name"], oct(mode))
        # uid 10001 is not root: it reads the file through its group, the fsGroup.
        assert fs_group == pod["securityContext"]["runAsGroup"] and mode & 0o040
    # Kubernetes' own default mode would be refused.
    assert secret_file_problem(0o644, 0, euid=uid) is not None


def test_settings_production_and_secrets_from_secrets(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    e = env(docs)
    assert e["CITADEL_ENV"] == "production"
    assert e["CITADEL_PROVIDER"] == name
    assert "CITADEL_API_KEYS" not in e and "CITADEL_DOCS" not in e
    secret_valued = ["CITADEL_AUDIT_PSEUDONYM_KEY", "CITADEL_RATE_LIMIT_STORAGE_URI"]
    if name == "evervault":
        secret_valued += ["EVERVAULT_APP_ID", "EVERVAULT_API_KEY"]
    for var in secret_valued:
        assert set(e[var]) == {"secretKeyRef"}, var
    for var in e:
        assert re.fullmatch(r"(CITADEL|EVERVAULT)_[A-Z_]+", var), var


def test_image_is_the_packaged_version(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container(docs)["image"] == f"citadel:{version}"


# --- network policy -----------------------------------------------------------------


def policies(docs: list[Doc]) -> list[Doc]:
    found = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for p in found:
        assert p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "citadel"}}
    return found


def test_only_sentinel_conductor_and_the_scraper_reach_citadel(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    ingress = [(p, rule) for p in policies(docs) for rule in p["spec"].get("ingress", [])]
    assert len(ingress) == 1
    policy, rule = ingress[0]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert rule["ports"] == [{"port": 8004, "protocol": "TCP"}]
    callers, scraper = rule["from"]
    assert callers == {
        "podSelector": {
            "matchExpressions": [
                {
                    "key": "app.kubernetes.io/name",
                    "operator": "In",
                    "values": ["sentinel", "conductor"],
                }
            ]
        }
    }
    assert scraper == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


def test_citadel_reaches_only_dns_redis_and_in_the_evervault_overlay_evervault(
    overlay: tuple[str, list[Doc]],
) -> None:
    name, docs = overlay
    egress = [rule for p in policies(docs) for rule in p["spec"].get("egress", [])]
    for p in policies(docs):
        assert "Egress" in p["spec"]["policyTypes"]
    dns, redis, *internet = egress
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert redis == {
        "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}],
        "ports": [{"port": 6379, "protocol": "TCP"}],
    }
    if name == "local":
        assert internet == []
        return
    (https,) = internet
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    v4, v6 = (peer["ipBlock"] for peer in https["to"])
    assert v4["cidr"] == "0.0.0.0/0" and set(v4["except"]) >= PRIVATE_V4
    assert v6["cidr"] == "::/0" and "fc00::/7" in v6["except"]
