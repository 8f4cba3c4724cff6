"""Ask a container registry (Docker Registry HTTP API v2) whether an image exists.

``manifest_digest("registry.example/team/lungxray:abc123")`` sends
``HEAD /v2/team/lungxray/manifests/abc123`` and returns the ``Docker-Content-Digest`` the
registry answers, or raises RegistryError with one line. A ``401`` with a Bearer challenge is
answered the way ``docker pull`` does: a token from the challenge's realm (anonymous, or with
the given user and password), then the HEAD again.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request

DOCKER_HUB = "registry-1.docker.io"
# Index types first: for a multi-arch image the digest of the index is the one to pin.
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(RuntimeError):
    """The image is not in the registry, or the registry could not be asked; one line."""


def split_reference(image: str) -> tuple[str, str, str]:
    """(registry host, repository, tag or digest) of an image reference, Docker's rules:
    the first component is a host when it has a '.' or ':' or is localhost."""
    name, at, digest = image.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, name if slash else f"library/{name}"
    repo, colon, tag = path.rpartition(":") if ":" in path else (path, "", "")
    reference = digest if at else (tag if colon else "latest")
    return host, repo, reference


def registry_url(host: str, scheme: str | None = None) -> str:
    """Base URL; plain http only for a registry on this machine (kind's localhost:5001)."""
    if scheme is None:
        local = host.split(":")[0] in ("localhost", "127.0.0.1", "[::1]")
        scheme = "http" if local else "https"
    return f"{scheme}://{host}"


def _open(request: urllib.request.Request, timeout: float):
    # No *_proxy handling: the registry is reached as the cluster nodes reach it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(request, timeout=timeout)


def _bearer_token(challenge: str, credentials: tuple[str, str] | None, timeout: float) -> str:
    """Token from the realm of a ``WWW-Authenticate: Bearer realm=...`` challenge."""
    fields = dict(_CHALLENGE.findall(challenge))
    if "realm" not in fields:
        raise RegistryError(f"registry auth challenge without a realm: {challenge!r}")
    query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
    request = urllib.request.Request(f"{fields['realm']}?{query}")
    if credentials:
        request.add_header("Authorization", _basic(credentials))
    try:
        with _open(request, timeout) as resp:
            payload = json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryError(f"registry token service {fields['realm']} failed: "
                            f"{getattr(exc, 'reason', exc)}") from None
    token = payload.get("token") or payload.get("access_token")
    if not token:
        raise RegistryError(f"registry token service {fields['realm']} returned no token")
    return token


def _basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(credentials).encode()).decode()


def _head(url: str, auth: str | None, timeout: float):
    request = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_TYPES})
    if auth:
        request.add_header("Authorization", auth)
    return _open(request, timeout)


def manifest_digest(image: str, credentials: tuple[str, str] | None = None,
                    scheme: str | None = None, timeout: float = 10.0) -> str:
    """Digest (``sha256:...``) of the image's manifest; RegistryError if it is not there."""
    host, repo, reference = split_reference(image)
    url = f"{registry_url(host, scheme)}/v2/{repo}/manifests/{reference}"
    hint = "push it first (make push), or pass --no-image-check"
    auth = None
    for _attempt in range(2):
        try:
            with _head(url, auth, timeout) as resp:
                digest = resp.headers.get("Docker-Content-Digest", "")
                if not digest.startswith("sha256:") and "@" in image:
                    digest = reference  # a registry may omit the header for a digest lookup
                return digest
        except urllib.error.HTTPError as exc:
            challenge = exc.headers.get("WWW-Authenticate", "")
            if exc.code == 401 and auth is None and challenge.lower().startswith("bearer"):
                auth = "Bearer " + _bearer_token(challenge, credentials, timeout)
                continue
            if exc.code == 401 and auth is None and credentials:
                auth = _basic(credentials)
                continue
            if exc.code == 404:
                raise RegistryError(f"image {image} is not in registry {host} "
                                    f"(HEAD {url}: 404); {hint}") from None
            if exc.code in (401, 403):
                raise RegistryError(f"registry {host} refused HEAD {url} ({exc.code}): set "
                                    "REGISTRY_USER and REGISTRY_PASSWORD, or pass "
                                    "--no-image-check") from None
            raise RegistryError(f"registry {host} answered HTTP {exc.code} on HEAD {url}; "
                                f"{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(f"registry {host} is unreachable "
                                f"({getattr(exc, 'reason', exc)}); pass --no-image-check to "
                                "submit without checking") from None
    raise RegistryError(f"registry {host} refused the credentials for {image}")


def check_pushed(image: str, credentials: tuple[str, str] | None = None,
                 scheme: str | None = None) -> str:
    """The tag's digest; for ``name:tag@sha256:...`` also that the tag still points there."""
    name, _, pinned = image.partition("@")
    digest = manifest_digest(name, credentials, scheme)
    if pinned and digest and digest != pinned:
        raise RegistryError(f"{name} now points to {digest}, not the {pinned} the package was "
                            "compiled for; run `make compile` (or push the matching image)")
    return digest
