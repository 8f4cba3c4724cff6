"""Compile the pipeline for a cluster: ``python -m pipelines.compile --image IMAGE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import build_pipeline


def compile_pipeline(output_path: str | Path, image: str, cluster: bool = True,
                     parallelism: int = 0) -> Path:
    """Write the pipeline spec YAML for components running in ``image``."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, cluster=cluster, parallelism=parallelism),
                                str(output_path))
    return output_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True,
                        help="container image for every component (use an immutable tag)")
    parser.add_argument("--output", default="build/pipeline.yaml", help="pipeline YAML path")
    parser.add_argument("--parallelism", type=int, default=0,
                        help="base models trained at once (0 = all)")
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, args.image, parallelism=args.parallelism))


if __name__ == "__main__":
    main()
