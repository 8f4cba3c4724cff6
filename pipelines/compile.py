"""Compile the pipeline for a cluster: ``python -m pipelines.compile --image IMAGE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import build_pipeline


RETRIES = 2  # tune and train, for preempted GPU nodes


def compile_pipeline(output_path: str | Path, image: str, gpu: bool = True,
                     parallelism: int = 0) -> Path:
    """Write the pipeline spec YAML for components running in ``image``."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(image, gpu=gpu, retries=RETRIES, parallelism=parallelism)
    compiler.Compiler().compile(pipeline, str(output_path))
    return output_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True,
                        help="container image for every component (use an immutable tag)")
    parser.add_argument("--output", default="build/pipeline.yaml", help="pipeline YAML path")
    parser.add_argument("--parallelism", type=int, default=0,
                        help="base models trained at once (0 = all)")
    parser.add_argument("--no-gpu", action="store_true",
                        help="no GPU request (CPU-only clusters such as kind or minikube)")
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, args.image, gpu=not args.no_gpu,
                           parallelism=args.parallelism))


if __name__ == "__main__":
    main()
