"""KFP component: prepare the dataset (splits + manifest) from the pipeline's data source."""

from kfp.dsl import Dataset, Markdown, Output


def preprocess(
    source: str,
    image_size: int,
    seed: int,
    max_per_split: int,
    data_version: str,
    dataset: Output[Dataset],
    summary: Output[Markdown],
):
    """Prepare ``source``; ``image_size`` 0 keeps the source's size. ``data_version`` is not read:
    it is part of the cache key, so new data under the same URI is never served from cache."""
    from pathlib import Path

    from lungxray import data

    manifest = data.preprocess(source, Path(dataset.path), image_size=image_size or None,
                               seed=seed, max_per_split=max_per_split)
    dataset.metadata.update(data.manifest_metadata(manifest))
    Path(summary.path).write_text(data.describe_manifest(manifest))
