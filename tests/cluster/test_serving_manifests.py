"""manifests/serving renders offline, its ServiceAccount validates against the Kubernetes schema,
and its InferenceService against KServe's own CRD schema.

No KServe CRD schema ships with kubernetes-validate, so the OpenAPI v3 schema of the
``v1beta1`` InferenceService (``status`` dropped) is vendored, gzipped, from the KServe CRD:
repository kserve/kserve, commit aaac4e294dae2c7b1aa1886447793f3aa1c30912,
``config/crd/full/serving.kserve.io_inferenceservices.yaml``. ``KSERVE_CRD=<that file>``
re-checks the vendored copy against a newer CRD. Unknown fields are refused as the API server
does with strict field validation (``kubectl apply --validate=strict``): every object schema
that lists its properties and does not preserve unknown fields gets
``additionalProperties: false``.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "manifests" / "serving"
SCHEMA = Path(__file__).with_name("kserve_inferenceservice_v1beta1.schema.json.gz")
KUBECTL = shutil.which("kubectl")
KUBERNETES_VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
K8S_VERSION = "1.35.0"
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # KServe's rule for service names

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def crd_schema(crd: dict) -> dict:
    """The v1beta1 openAPIV3Schema of the InferenceService CRD, without ``status``."""
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused wherever Kubernetes would prune them."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([KUBECTL, "kustomize", str(SERVING)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(result.stdout) if d}


def errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_inference_service_validates_against_the_kserve_crd(rendered, validator):
    isvc = rendered["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert errors(validator, isvc) == []


def test_the_validation_catches_typos_and_wrong_types(rendered, validator):
    """The check above can fail: a misspelt field or a wrong type is reported."""
    typo = copy.deepcopy(rendered["InferenceService"])
    model = typo["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    assert any("storageURI" in e for e in errors(validator, typo))
    wrong = copy.deepcopy(rendered["InferenceService"])
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    assert any("minReplicas" in e for e in errors(validator, wrong))
    missing = copy.deepcopy(rendered["InferenceService"])
    del missing["spec"]["predictor"]["model"]["modelFormat"]["name"]
    assert any("'name' is a required property" in e for e in errors(validator, missing))


def test_it_serves_the_champion_savedmodel_with_a_recent_tf_serving(rendered):
    isvc, account = rendered["InferenceService"], rendered["ServiceAccount"]
    assert DNS_1035.fullmatch(isvc["metadata"]["name"]) and len(isvc["metadata"]["name"]) <= 45
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    # `lungxray export --output <champion_uri>/saved_model` writes <version>/saved_model.pb there.
    uri = model["storageUri"]
    assert re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*/(.+/)?champion/saved_model", uri)
    major, minor, _ = map(int, model["runtimeVersion"].split("."))
    assert (major, minor) >= (2, 13)  # older TF Serving lacks ops a TF 2.21 SavedModel uses
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert isvc["metadata"]["namespace"] == account["metadata"]["namespace"]
    assert all(r["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lungxray"
               for r in rendered.values())


@needs_kubectl
def test_the_service_account_validates_strictly(rendered, tmp_path):
    path = tmp_path / "sa.yaml"
    path.write_text(yaml.safe_dump(rendered["ServiceAccount"]))
    result = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "-k", K8S_VERSION, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not os.environ.get("KSERVE_CRD"), reason="KSERVE_CRD is not set")
def test_vendored_schema_matches_a_given_crd():
    crd = yaml.safe_load(Path(os.environ["KSERVE_CRD"]).read_text())
    assert crd_schema(crd) == json.loads(gzip.decompress(SCHEMA.read_bytes()))
