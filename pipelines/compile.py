"""Compile the pipeline for a cluster: ``python -m pipelines.compile --image IMAGE``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import Platform, Resources, build_pipeline

RETRIES = 2  # tune and train, for preempted GPU nodes
# Requests/limits per step class and package, sized from measured peak memory: one tune/train
# process peaked at 4.4 GiB (PROFILE=quick) and 5.7 GiB (PROFILE=full) at 32 px on CPU
# (bench/RESULTS.md); ResNet152V2 at 224 px needs about 8 GB. "CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM".
RESOURCES = {
    # GPU pool (g2-standard-8: 8 vCPU, 32 GB): ResNet152V2 at 224 px plus headroom.
    "gpu": {"heavy": "4/8,12Gi/16Gi", "light": "1/4,4Gi/8Gi"},
    # kind/minikube with 8 GiB for the whole node, KFP itself included: one model at a time
    # (PARALLELISM=1) at the small sizes of params/kind.yaml.
    "cpu": {"heavy": "2/4,3Gi/5Gi", "light": "500m/2,1Gi/3Gi"},
}
# Vertex AI picks the machine type from the limits and ignores requests.
VERTEX_RESOURCES = {"heavy": "-/8,-/32G", "light": "-/4,-/16G"}
# Accelerator types Vertex AI Pipelines accepts for set_accelerator_type (its API enum).
VERTEX_ACCELERATORS = frozenset({
    "NVIDIA_TESLA_T4", "NVIDIA_L4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_P4",
    "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB",
    "NVIDIA_H200_141GB", "NVIDIA_B200",
})
_QUANTITY = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:m|[KMGTPE]i?)?)$")
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


def parse_resources(text: str) -> Resources:
    """``"CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM"`` (Kubernetes quantities, ``-`` for unset)."""
    cpu, sep, memory = text.partition(",")
    if not sep:
        raise ValueError(f"resources {text!r}: expected CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM, "
                         "e.g. 2/4,3Gi/5Gi")
    values = []
    for pair in (cpu, memory):
        request, _, limit = pair.strip().partition("/")
        for value in (request, limit):
            if value not in ("", "-") and not _QUANTITY.match(value):
                raise ValueError(f"resources {text!r}: {value!r} is not a quantity such as "
                                 "500m, 2, 3Gi")
        values += [None if v in ("", "-") else v for v in (request, limit)]
    res = Resources(*values)
    for kind, req, lim in (("cpu", res.cpu_request, res.cpu_limit),
                           ("memory", res.memory_request, res.memory_limit)):
        if req and lim and _amount(req) > _amount(lim):
            raise ValueError(f"resources {text!r}: {kind} request {req} is above its limit {lim}")
    return res


def _amount(quantity: str) -> float:
    """A quantity as a number, only to compare a request with its limit."""
    units = {"m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    number = re.match(r"[0-9.]+", quantity).group()
    return float(number) * units.get(quantity[len(number):], 1)


def pin_digest(image: str, digest: str) -> str:
    """``image`` with its tag kept and ``@sha256:...`` appended (what the nodes then pull)."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"image digest {digest!r} is not sha256:<64 hex digits>")
    if "@" in image:
        raise ValueError(f"--image {image!r} already has a digest")
    return f"{image}@{digest}"


def compile_pipeline(output_path: str | Path, image: str, gpu: bool = True,
                     parallelism: int | None = None,
                     gpu_node_selector: tuple[str, str] | None = None,
                     gcs_secret: str | None = None, cache_pvc: str | None = None,
                     gpus: int = 1, heavy: Resources | None = None,
                     light: Resources | None = None, vertex_accelerator: str | None = None,
                     image_digest: str | None = None) -> Path:
    """Write the pipeline spec YAML for components running in ``image`` on a cluster.

    ``parallelism`` None: one model at a time with ``cache_pvc`` (a ReadWriteOnce volume can
    only be mounted on one node) or without GPUs (a small CPU cluster holds one training pod),
    else every model at once. ``heavy``/``light`` None: the sizes of ``RESOURCES``.
    ``vertex_accelerator`` (e.g. NVIDIA_L4) compiles for Vertex AI Pipelines instead: that
    accelerator type, no Kubernetes settings. ``image_digest`` pins ``image@sha256:...``.
    """
    check_image_reference(image)
    if image_digest:
        image = pin_digest(image, image_digest)
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus} (use --no-gpu for none)")
    if parallelism is None:
        parallelism = 1 if cache_pvc or not gpu else 0
    if parallelism < 0:
        raise ValueError(f"parallelism must be 0 (no bound) or more, got {parallelism}")
    vertex = vertex_accelerator is not None
    if vertex and vertex_accelerator not in VERTEX_ACCELERATORS:
        raise ValueError(f"Vertex accelerator {vertex_accelerator!r} is not one of "
                         f"{', '.join(sorted(VERTEX_ACCELERATORS))}")
    if vertex and (gcs_secret or cache_pvc or gpu_node_selector):
        raise ValueError("Vertex AI Pipelines runs no Kubernetes settings: drop GCS_SECRET, "
                         "CACHE_PVC and GPU_NODE_SELECTOR (the run's service account reads GCS)")
    sizes = VERTEX_RESOURCES if vertex else RESOURCES["gpu" if gpu else "cpu"]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    platform = Platform(gpu=gpu, gpus=gpus, retries=RETRIES, gpu_node_selector=gpu_node_selector,
                        gcs_secret=gcs_secret, cache_pvc=cache_pvc,
                        accelerator=vertex_accelerator or Platform.accelerator,
                        kubernetes=not vertex,
                        heavy=heavy or parse_resources(sizes["heavy"]),
                        light=light or parse_resources(sizes["light"]))
    compiler.Compiler().compile(build_pipeline(image, platform, parallelism), str(output_path))
    return output_path


def _label(value: str) -> tuple[str, str]:
    key, sep, label = value.partition("=")
    if not sep or not key or not label:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, label


def _resources(value: str) -> Resources:
    try:
        return parse_resources(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True,
                        help="container image for every component (use an immutable tag)")
    parser.add_argument("--output", default="build/pipeline.yaml", help="pipeline YAML path")
    parser.add_argument("--parallelism", type=int, default=None,
                        help="base models trained at once (0 = all; default: all on GPUs, "
                             "1 with --cache-pvc or --no-gpu)")
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
    parser.add_argument("--heavy-resources", type=_resources, default=None,
                        metavar="CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM",
                        help="tune and train pods, e.g. 4/8,12Gi/16Gi (default: sized for the "
                             "package, see RESOURCES)")
    parser.add_argument("--light-resources", type=_resources, default=None,
                        metavar="CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM",
                        help="preprocess, evaluate and compare pods, e.g. 1/4,4Gi/8Gi")
    parser.add_argument("--vertex-accelerator", default=None, metavar="TYPE",
                        help="compile for Vertex AI Pipelines with this accelerator type "
                             "(e.g. NVIDIA_L4) instead of nvidia.com/gpu")
    parser.add_argument("--image-digest", default=None, metavar="sha256:...|auto",
                        help="pin the image by digest; auto asks the registry (v2 API)")
    args = parser.parse_args(argv)
    if args.cache_pvc and args.parallelism not in (None, 1):
        print(f"pipelines.compile: warning: --parallelism {args.parallelism} with --cache-pvc "
              "needs a ReadWriteMany volume; a ReadWriteOnce one (manifests/base/pvc.yaml) "
              "attaches to one node only", file=sys.stderr)
    try:
        digest = args.image_digest
        if digest == "auto":
            from pipelines.registry import manifest_digest

            digest = manifest_digest(args.image)
        print(compile_pipeline(args.output, args.image, gpu=not args.no_gpu,
                               parallelism=args.parallelism,
                               gpu_node_selector=args.gpu_node_selector,
                               gcs_secret=args.gcs_secret, cache_pvc=args.cache_pvc,
                               gpus=args.gpus, heavy=args.heavy_resources,
                               light=args.light_resources,
                               vertex_accelerator=args.vertex_accelerator, image_digest=digest))
    except (ValueError, RuntimeError) as exc:  # RuntimeError: registry.RegistryError
        print(f"pipelines.compile: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pipelines.compile: error: cannot write {args.output}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
