"""Every kustomize overlay renders, validates strictly against the Kubernetes schema, and
says what we mean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
# kind/cluster.yaml pins a v1.35 node image; validate against the same API version.
K8S_VERSION = "1.35.0"
KUBECTL = shutil.which("kubectl")
KUBERNETES_VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
NAMESPACE = "kubeflow"  # KFP standalone runs pipeline pods here
SA = "lungxray-pipeline-runner"
PVC = "lungxray-cache"
WI_KEY = "iam.gke.io/gcp-service-account"

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def render(overlay: str) -> str:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(overlay: str) -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_expected_overlays_exist() -> None:
    assert {"kind", "gke"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay))
    result = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", K8S_VERSION, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


@needs_kubectl
def test_strict_validation_catches_a_typo(tmp_path: Path) -> None:
    """Guards the test above: the validator really rejects an unknown field."""
    bad = yaml.safe_load_all(render("kind"))
    docs = [d for d in bad if d]
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "accessMode" in result.stdout + result.stderr


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_common_content(overlay: str) -> None:
    objs = objects(overlay)
    # Never a Namespace: `kubectl delete -k` must not take KFP's namespace with it.
    assert not [k for k in objs if k[0] == "Namespace"]
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objs.values())

    assert ("ServiceAccount", SA) in objs
    binding = objs[("RoleBinding", SA)]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "pipeline-runner",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SA, "namespace": NAMESPACE}]

    pvc = objs[("PersistentVolumeClaim", PVC)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

    job = objs[("Job", "lungxray-cache-permissions")]
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": PVC}}]
    (container,) = pod["containers"]
    # Same UID as the image's USER (docker/Dockerfile*).
    assert "chown 1000:0 /cache" in container["command"][-1]
    image = container["image"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest")


@needs_kubectl
def test_kind_overlay() -> None:
    objs = objects("kind")
    sa = objs[("ServiceAccount", SA)]
    assert WI_KEY not in sa["metadata"].get("annotations", {})
    pvc = objs[("PersistentVolumeClaim", PVC)]
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert (
        "tolerations" not in objs[("Job", "lungxray-cache-permissions")]["spec"]["template"]["spec"]
    )


@needs_kubectl
def test_gke_overlay() -> None:
    objs = objects("gke")
    gsa = objs[("ServiceAccount", SA)]["metadata"]["annotations"][WI_KEY]
    assert re.fullmatch(
        r"[a-z][a-z0-9-]{4,28}[a-z0-9]@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com", gsa
    )
    pvc = objs[("PersistentVolumeClaim", PVC)]
    assert pvc["spec"]["storageClassName"] in ("standard-rwo", "premium-rwo")
    pod = objs[("Job", "lungxray-cache-permissions")]["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]


def test_kind_cluster_config_pins_node_image_by_digest() -> None:
    config = yaml.safe_load((MANIFESTS / "kind" / "cluster.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    images = [n["image"] for n in config["nodes"]]
    assert images
    for image in images:
        assert re.fullmatch(r"kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}", image), image
        assert image.split(":")[1].startswith("v" + K8S_VERSION.rsplit(".", 1)[0])


@needs_kubectl
def test_local_registry_configmap_validates(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(KUBERNETES_VALIDATE),
            "--strict",
            "-k",
            K8S_VERSION,
            str(MANIFESTS / "kind" / "local-registry-hosting.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
