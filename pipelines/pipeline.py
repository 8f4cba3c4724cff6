"""The lungxray DAG: preprocess -> ParallelFor(base models){tune -> train -> evaluate} -> compare.

Only the graph lives here; everything that reads parameter values runs inside components.
"""


from collections.abc import Callable

from kfp import dsl

import components

PIPELINE_NAME = "lungxray"
DEFAULT_MODELS = ["VGG16", "ResNet152V2", "InceptionV3"]
GPU_RESOURCE = "nvidia.com/gpu"


def _on_cluster(task: dsl.PipelineTask, gpu: bool, retries: int) -> None:
    """Retries with backoff (preemptible nodes vanish) and, with ``gpu``, one NVIDIA GPU and
    the toleration GPU node pools are usually tainted with."""
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    if gpu:
        from kfp import kubernetes

        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists",
                                  effect="NoSchedule")


def build_pipeline(image: str = components.LOCAL_IMAGE, gpu: bool = False, retries: int = 0,
                   parallelism: int = 1) -> Callable:
    """The pipeline function for ``image``. ``gpu`` requests a GPU for tune and train,
    ``retries`` retries them, ``parallelism`` bounds how many base models run at once
    (0 = no bound)."""
    ops = components.build(image)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Tune, fine-tune and compare Keras Applications models for lung "
                              "X-ray classification; the best model is chosen on validation.")
    def lungxray(
        data_source: str = "pneumoniamnist",
        base_models: list = DEFAULT_MODELS,  # noqa: B006 - KFP reads the default from here
        image_size: int = 0,
        weights: str = "imagenet",
        epochs: int = 6,
        tune_trials: int = 3,
        tune_epochs: int = 2,
        tune_train_samples: int = 0,
        batch_size: int = 32,
        max_per_split: int = 0,
        seed: int = 42,
        select_metric: str = "val_roc_auc",
        data_version: str = "",
    ) -> dsl.HTML:
        prep = ops.preprocess(source=data_source, image_size=image_size, seed=seed,
                              max_per_split=max_per_split, data_version=data_version)
        prep.set_display_name("preprocess")
        dataset = prep.outputs["dataset"]
        with dsl.ParallelFor(base_models, parallelism=parallelism, name="per-model") as name:
            tune = ops.tune(dataset=dataset, model_name=name, max_trials=tune_trials,
                            epochs=tune_epochs, weights=weights, batch_size=batch_size,
                            seed=seed, train_samples=tune_train_samples)
            train = ops.train(dataset=dataset, tuning=tune.outputs["tuning"], model_name=name,
                              epochs=epochs, weights=weights, batch_size=batch_size, seed=seed)
            evaluate = ops.evaluate(dataset=dataset, model=train.outputs["model"])
            for task in (tune, train):
                _on_cluster(task, gpu, retries)
        compare = ops.compare(models=dsl.Collected(train.outputs["model"]),
                              evaluations=dsl.Collected(evaluate.outputs["evaluation"]),
                              tunings=dsl.Collected(tune.outputs["tuning"]),
                              select_metric=select_metric)
        return compare.outputs["report"]

    return lungxray
