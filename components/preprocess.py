"""KFP component: prepare the dataset (splits + manifest + data report) from the data source."""

from kfp.dsl import HTML, Dataset, Markdown, Output


def preprocess(
    source: str,
    image_size: int,
    seed: int,
    max_per_split: int,
    data_version: str,
    dataset: Output[Dataset],
    summary: Output[Markdown],
    report: Output[HTML],
    skip_bad: bool = False,
    keep_aspect: bool = False,
    shifted_test_fraction: float = 0.1,
    sites: str = "",
    holdout_site: str = "",
):
    """Prepare ``source``; ``image_size`` 0 keeps the source's size. ``data_version`` is not read:
    it is part of the cache key, so new data under the same URI is never served from cache.
    ``skip_bad`` leaves unusable files out (listed in the report) instead of failing;
    ``keep_aspect`` pads images to square instead of stretching them. ``shifted_test_fraction``
    > 0 also holds out a ``test_shifted`` split of whole image-statistics clusters (a proxy for
    another machine's images), evaluated beside ``test``. ``sites`` ("NAME=SOURCE,...") prepares
    more sources into the same splits, each carved on its own and recorded per image;
    ``holdout_site`` puts one site whole into ``test_site_<name>``."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    import shutil
    from pathlib import Path

    from lungxray import data, datareport, prepare
    from lungxray import sites as siting

    manifest = prepare.preprocess(source, Path(dataset.path), image_size=image_size or None,
                                  seed=seed, max_per_split=max_per_split, skip_bad=skip_bad,
                                  keep_aspect=keep_aspect,
                                  shifted_test_fraction=shifted_test_fraction,
                                  sites=siting.parse_sites(sites),
                                  holdout_site=holdout_site or None)
    dataset.metadata.update(data.manifest_metadata(manifest))
    # The same files also stay inside the dataset, so the report travels with the data.
    for name, artifact in ((datareport.MARKDOWN_FILE, summary), (datareport.HTML_FILE, report)):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(dataset.path) / name, artifact.path)
