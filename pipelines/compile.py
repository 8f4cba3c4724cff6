"""Compile the pipeline for a cluster: ``python -m pipelines.compile --image IMAGE``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import Platform, build_pipeline

RETRIES = 2  # tune and train, for preempted GPU nodes
# [host[:port]/]path[:tag][@digest] as in Docker's reference grammar: lower-case path
# components joined by '/', each alphanumeric runs separated by '.', '_', '__' or dashes.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def check_image_reference(image: str) -> None:
    """Refuse an image a cluster could not pull, or one whose content may change under a run.

    KFP caches steps on the image string, so an untagged (``:latest``) image would reuse results
    computed by whatever that name pointed to before.
    """
    if not _IMAGE.match(image or ""):
        raise ValueError(f"--image {image!r} is not a container image reference such as "
                         "registry.example/lungxray:0123abcd (is REGISTRY or TAG empty?)")
    name = image.split("@", 1)[0]
    if "@" not in image and name.rfind(":") <= name.rfind("/"):
        raise ValueError(f"--image {image!r} has no tag or digest; use an immutable tag")


def compile_pipeline(output_path: str | Path, image: str, gpu: bool = True,
                     parallelism: int | None = None,
                     gpu_node_selector: tuple[str, str] | None = None,
                     gcs_secret: str | None = None, cache_pvc: str | None = None,
                     gpus: int = 1) -> Path:
    """Write the pipeline spec YAML for components running in ``image`` on a cluster.

    ``parallelism`` None: one model at a time with ``cache_pvc`` (a ReadWriteOnce volume can
    only be mounted on one node), else every model at once.
    """
    check_image_reference(image)
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus} (use --no-gpu for none)")
    if parallelism is None:
        parallelism = 1 if cache_pvc else 0
    if parallelism < 0:
        raise ValueError(f"parallelism must be 0 (no bound) or more, got {parallelism}")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    platform = Platform(gpu=gpu, gpus=gpus, retries=RETRIES, gpu_node_selector=gpu_node_selector,
                        gcs_secret=gcs_secret, cache_pvc=cache_pvc)
    compiler.Compiler().compile(build_pipeline(image, platform, parallelism), str(output_path))
    return output_path


def _label(value: str) -> tuple[str, str]:
    key, sep, label = value.partition("=")
    if not sep or not key or not label:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True,
                        help="container image for every component (use an immutable tag)")
    parser.add_argument("--output", default="build/pipeline.yaml", help="pipeline YAML path")
    parser.add_argument("--parallelism", type=int, default=None,
                        help="base models trained at once (0 = all; default: all, or 1 with "
                             "--cache-pvc)")
    parser.add_argument("--no-gpu", action="store_true",
                        help="no GPU request (CPU-only clusters such as kind or minikube)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs per tune/train pod (default 1; more train data-parallel)")
    parser.add_argument("--gpu-node-selector", type=_label, default=None, metavar="KEY=VALUE",
                        help="node label for tune/train, e.g. "
                             "cloud.google.com/gke-accelerator=nvidia-l4")
    parser.add_argument("--gcs-secret", default=None, help="Secret with a service-account "
                        "key.json for gs:// (not needed with Workload Identity)")
    parser.add_argument("--cache-pvc", default=None, help="PVC mounted on tune/train for "
                        "state that survives retries (e.g. lungxray-cache)")
    args = parser.parse_args(argv)
    if args.cache_pvc and args.parallelism not in (None, 1):
        print(f"pipelines.compile: warning: --parallelism {args.parallelism} with --cache-pvc "
              "needs a ReadWriteMany volume; a ReadWriteOnce one (manifests/base/pvc.yaml) "
              "attaches to one node only", file=sys.stderr)
    try:
        print(compile_pipeline(args.output, args.image, gpu=not args.no_gpu,
                               parallelism=args.parallelism,
                               gpu_node_selector=args.gpu_node_selector,
                               gcs_secret=args.gcs_secret, cache_pvc=args.cache_pvc,
                               gpus=args.gpus))
    except ValueError as exc:
        print(f"pipelines.compile: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pipelines.compile: error: cannot write {args.output}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
