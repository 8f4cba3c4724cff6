"""components.build: every component for an explicit container image."""

from __future__ import annotations

import components


def test_components_build_for_an_explicit_image():
    ops = components.build("registry.example/lungxray:abc123")
    for name in components.FUNCTIONS:
        spec = getattr(ops, name).component_spec
        container = spec.implementation.container
        assert container.image == "registry.example/lungxray:abc123"
        assert "pip install" not in " ".join(container.command)  # nothing installed at run time
