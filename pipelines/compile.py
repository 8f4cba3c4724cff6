"""Compile the pipeline for a cluster: ``python -m pipelines.compile --image IMAGE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import Platform, build_pipeline

RETRIES = 2  # tune and train, for preempted GPU nodes


def compile_pipeline(output_path: str | Path, image: str, gpu: bool = True,
                     parallelism: int = 0, gpu_node_selector: tuple[str, str] | None = None,
                     gcs_secret: str | None = None, cache_pvc: str | None = None) -> Path:
    """Write the pipeline spec YAML for components running in ``image`` on a cluster."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    platform = Platform(gpu=gpu, retries=RETRIES, gpu_node_selector=gpu_node_selector,
                        gcs_secret=gcs_secret, cache_pvc=cache_pvc)
    compiler.Compiler().compile(build_pipeline(image, platform, parallelism), str(output_path))
    return output_path


def _label(value: str) -> tuple[str, str]:
    key, sep, label = value.partition("=")
    if not sep or not key or not label:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True,
                        help="container image for every component (use an immutable tag)")
    parser.add_argument("--output", default="build/pipeline.yaml", help="pipeline YAML path")
    parser.add_argument("--parallelism", type=int, default=0,
                        help="base models trained at once (0 = all)")
    parser.add_argument("--no-gpu", action="store_true",
                        help="no GPU request (CPU-only clusters such as kind or minikube)")
    parser.add_argument("--gpu-node-selector", type=_label, default=None, metavar="KEY=VALUE",
                        help="node label for tune/train, e.g. "
                             "cloud.google.com/gke-accelerator=nvidia-l4")
    parser.add_argument("--gcs-secret", default=None, help="Secret with a service-account "
                        "key.json for gs:// (not needed with Workload Identity)")
    parser.add_argument("--cache-pvc", default=None, help="PVC mounted on tune/train for "
                        "state that survives retries (e.g. lungxray-cache)")
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, args.image, gpu=not args.no_gpu,
                           parallelism=args.parallelism,
                           gpu_node_selector=args.gpu_node_selector,
                           gcs_secret=args.gcs_secret, cache_pvc=args.cache_pvc))


if __name__ == "__main__":
    main()
