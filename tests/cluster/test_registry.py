"""pipelines.registry and the image check of submit against a stand-in Docker registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.compile import compile_pipeline
from pipelines.registry import RegistryError, check_pushed, manifest_digest, split_reference
from pipelines.submit import KfpError, submit_run
from tests.cluster.fake_kfp import API, FakeKfp
from tests.cluster.fake_vertex import FakeRegistry

DIGEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64


@pytest.mark.parametrize(("image", "expected"), [
    ("localhost:5001/lungxray:abc", ("localhost:5001", "lungxray", "abc")),
    ("europe-docker.pkg.dev/p/r/lungxray:abc", ("europe-docker.pkg.dev", "p/r/lungxray", "abc")),
    ("tensorflow/tensorflow:2.21.0-gpu", ("registry-1.docker.io", "tensorflow/tensorflow",
                                          "2.21.0-gpu")),
    ("python:3.11", ("registry-1.docker.io", "library/python", "3.11")),
    (f"localhost/x:t@{DIGEST}", ("localhost", "x", DIGEST)),
])
def test_split_reference(image: str, expected: tuple[str, str, str]) -> None:
    assert split_reference(image) == expected


def test_head_on_the_manifest_returns_the_digest() -> None:
    with FakeRegistry() as registry:
        image = registry.add("team/lungxray", "abc123", DIGEST)
        assert manifest_digest(image) == DIGEST
        (head,) = registry.requests
        assert (head.method, head.path) == ("HEAD", "/v2/team/lungxray/manifests/abc123")
        # Index types are accepted, so a multi-arch image is found by its index digest.
        assert "application/vnd.oci.image.index.v1+json" in head.headers["Accept"]


def test_missing_image_is_one_clear_line() -> None:
    with FakeRegistry() as registry, pytest.raises(RegistryError,
                                                  match="is not in registry .*--no-image-check"):
        manifest_digest(f"{registry.netloc}/team/lungxray:nope")


def test_bearer_challenge_is_answered_with_a_token() -> None:
    with FakeRegistry(token="tok", credentials=("robot", "pw")) as registry:
        image = registry.add("team/lungxray", "abc123", DIGEST)
        assert manifest_digest(image, credentials=("robot", "pw")) == DIGEST
        first, token, second = registry.requests
        assert first.headers.get("Authorization") is None  # anonymous first, as docker does
        assert token.path == "/token" and token.query["scope"] == "repository:team/lungxray:pull"
        assert second.headers["Authorization"] == "Bearer tok"
        with pytest.raises(RegistryError, match="token service .* failed"):
            manifest_digest(image, credentials=("robot", "wrong"))


def test_unreachable_registry() -> None:
    with FakeRegistry() as registry:
        netloc = registry.netloc
    with pytest.raises(RegistryError, match="unreachable.*--no-image-check"):
        manifest_digest(f"{netloc}/lungxray:abc")


def test_a_digest_pinned_package_must_match_the_tag() -> None:
    with FakeRegistry() as registry:
        image = registry.add("lungxray", "abc", DIGEST)
        assert check_pushed(f"{image}@{DIGEST}") == DIGEST
        with pytest.raises(RegistryError, match=f"now points to {DIGEST}.*make compile"):
            check_pushed(f"{image}@{OTHER}")


def test_submit_checks_the_registry_before_sending(fake_kfp: FakeKfp, tmp_path: Path) -> None:
    with FakeRegistry() as registry:
        image = f"{registry.netloc}/lungxray:unpushed"
        package = compile_pipeline(tmp_path / "p.yaml", image, gpu=False)
        with pytest.raises(KfpError, match="is not in registry"):
            submit_run(fake_kfp.url, "e", str(package), {}, expect_image=image)
        assert fake_kfp.requests == []  # nothing reached KFP
        submit_run(fake_kfp.url, "e", str(package), {}, expect_image=image, image_check=False)
        assert fake_kfp.calls("POST", f"{API}/runs")


def test_compile_with_the_registry_digest_then_submit(fake_kfp: FakeKfp, tmp_path: Path) -> None:
    """IMAGE_DIGEST=auto: the package names image@digest; submit accepts it for IMAGE."""
    from pipelines.compile import main

    with FakeRegistry() as registry:
        image = registry.add("lungxray", "abc", DIGEST)
        out = tmp_path / "p.yaml"
        assert main(["--image", image, "--output", str(out), "--no-gpu",
                     "--image-digest", "auto"]) == 0
        assert f"{image}@{DIGEST}" in out.read_text()
        submit_run(fake_kfp.url, "e", str(out), {}, expect_image=image)
        registry.images[("lungxray", "abc")] = OTHER  # the tag was pushed again
        with pytest.raises(KfpError, match="now points to"):
            submit_run(fake_kfp.url, "e", str(out), {}, expect_image=image)
