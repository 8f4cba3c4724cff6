"""Download ImageNet "notop" weights of Keras Applications into $KERAS_HOME/models at build time.

Run by the Dockerfiles with the PREBAKE_WEIGHTS build arg, e.g. "VGG16 ResNet152V2 InceptionV3",
so a cluster without internet access can still fine-tune those backbones: Keras finds the cached
file under $KERAS_HOME/models/ and never downloads it.

Usage: python prebake_weights.py [NAME ...]   (names may also be comma-separated)
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterable
from types import ModuleType


def parse_names(args: Iterable[str]) -> list[str]:
    """Split build-arg words on whitespace and commas, keep order, drop duplicates."""
    names: list[str] = []
    for arg in args:
        for name in arg.replace(",", " ").split():
            if name not in names:
                names.append(name)
    return names


def resolve(applications: ModuleType, names: list[str]) -> list[tuple[str, Callable[..., object]]]:
    """Map each name to its constructor in keras.applications; fail on any unknown name first.

    Checking all names before downloading anything makes a typo fail the build in seconds
    instead of after gigabytes of other weights.
    """
    unknown = [n for n in names if not callable(getattr(applications, n, None))]
    if unknown:
        known = sorted(n for n in dir(applications) if n[:1].isupper())
        raise SystemExit(
            f"prebake_weights: unknown Keras application(s): {', '.join(unknown)}; "
            f"known: {', '.join(known)}"
        )
    return [(n, getattr(applications, n)) for n in names]


def prebake(applications: ModuleType, names: list[str], clear: Callable[[], None]) -> None:
    """Instantiate each backbone with ImageNet weights and no top, which caches the weights file."""
    for name, build in resolve(applications, names):
        print(f"prebake_weights: {name}", flush=True)
        build(weights="imagenet", include_top=False)
        # Free the graph before the next backbone: several large models would not fit the
        # memory of a small build machine at once.
        clear()
        gc.collect()


def main(argv: list[str]) -> int:
    names = parse_names(argv)
    if not names:
        print("prebake_weights: nothing to prebake (PREBAKE_WEIGHTS is empty)")
        return 0
    import keras  # deferred: the empty case above must not pay for importing TensorFlow

    prebake(keras.applications, names, keras.backend.clear_session)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
