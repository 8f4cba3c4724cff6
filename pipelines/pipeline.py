"""The lungxray DAG: preprocess -> ParallelFor(base models){tune -> train -> crossfold ->
evaluate} -> compare -> refit -> challenge/promote.

Only the graph lives here; everything that reads parameter values runs inside components. Each
parameter's type, default, range and description is lungxray.schema's (``DEFAULTS``).
"""


from collections.abc import Callable
from dataclasses import dataclass

from kfp import dsl

import components
from lungxray import schema
from lungxray.schema import DEFAULTS

PIPELINE_NAME = "lungxray"
DEFAULT_MODELS = DEFAULTS.base_models  # the models each profile starts from
GPU_RESOURCE = "nvidia.com/gpu"
CACHE_MOUNT = "/mnt/lungxray-cache"
SECRET_MOUNT = "/var/secrets/gcs"


@dataclass(frozen=True)
class Resources:
    """CPU and memory of one pod, Kubernetes quantities ("2", "500m", "12Gi"); None: unset."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


@dataclass(frozen=True)
class Platform:
    """Settings applied at compile time (kfp-kubernetes for a KFP cluster). The defaults are
    those of a local run (kfp.local ignores all of them anyway)."""

    gpu: bool = False  # tune and train request an accelerator
    # GPUs per tune/train pod. A compile-time constant, not a pipeline parameter: KFP 2.17's
    # compiler does not pass a parameter used only by set_accelerator_limit into a ParallelFor,
    # and the driver then refuses the task ("parent DAG does not have input parameter").
    gpus: int = 1
    # nvidia.com/gpu on Kubernetes; a Vertex AI type (NVIDIA_L4, NVIDIA_TESLA_T4, ...) there.
    accelerator: str = GPU_RESOURCE
    # False for Vertex AI Pipelines, which runs no kfp-kubernetes settings (tolerations, PVCs,
    # secrets): the package then carries only the portable parts of the pipeline spec.
    kubernetes: bool = True
    retries: int = 0  # tune and train, for preempted nodes
    gpu_node_selector: tuple[str, str] | None = None  # e.g. ("cloud.google.com/gke-accelerator",
    #                                                         "nvidia-l4")
    gcs_secret: str | None = None  # Secret holding a service-account `key.json`, if no WI
    cache_pvc: str | None = None  # PVC for tuner/training state that survives retries
    heavy: Resources = Resources()  # tune, train, crossfold and refit
    light: Resources = Resources()  # preprocess, evaluate, compare

    @property
    def state_root(self) -> str:
        return CACHE_MOUNT if self.cache_pvc else ""


def _set_resources(task: dsl.PipelineTask, res: Resources) -> None:
    """Requests and limits of one task; only those that are set."""
    if res.cpu_request:
        task.set_cpu_request(res.cpu_request)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_request:
        task.set_memory_request(res.memory_request)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


def _apply(task: dsl.PipelineTask, platform: Platform, heavy: bool) -> None:
    """Resources and credentials on every step; accelerator, node selector, retries and the
    state volume on the heavy ones (tune, train, crossfold, refit)."""
    _set_resources(task, platform.heavy if heavy else platform.light)
    if heavy and platform.retries:
        task.set_retry(num_retries=platform.retries, backoff_duration="60s", backoff_factor=2.0)
    if heavy and platform.gpu:
        task.set_accelerator_type(platform.accelerator).set_accelerator_limit(platform.gpus)
    if not platform.kubernetes:
        return
    from kfp import kubernetes

    if platform.gcs_secret:
        kubernetes.use_secret_as_volume(task, secret_name=platform.gcs_secret,
                                        mount_path=SECRET_MOUNT)
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{SECRET_MOUNT}/key.json")
    if not heavy:
        return
    if platform.gpu:
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists",
                                  effect="NoSchedule")
        if platform.gpu_node_selector:
            kubernetes.add_node_selector(task, *platform.gpu_node_selector)
    if platform.cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=platform.cache_pvc, mount_path=CACHE_MOUNT)


def build_pipeline(image: str = components.LOCAL_IMAGE, platform: Platform = Platform(),
                   parallelism: int = 1) -> Callable:
    """The pipeline function for ``image`` on ``platform``; ``parallelism`` bounds how many
    base models run at once (0 = no bound)."""
    ops = components.build(image)

    def lungxray(
        data_source: str = DEFAULTS.data_source,
        sites: str = DEFAULTS.sites,
        holdout_site: str = DEFAULTS.holdout_site,
        base_models: list = DEFAULTS.base_models,
        image_size: int = DEFAULTS.image_size,
        keep_aspect: bool = DEFAULTS.keep_aspect,
        skip_bad: bool = DEFAULTS.skip_bad,
        shifted_test_fraction: float = DEFAULTS.shifted_test_fraction,
        shift_folds: int = DEFAULTS.shift_folds,
        refit: bool = DEFAULTS.refit,
        weights: str = DEFAULTS.weights,
        epochs: int = DEFAULTS.epochs,
        tune_trials: int = DEFAULTS.tune_trials,
        tune_epochs: int = DEFAULTS.tune_epochs,
        tune_train_samples: int = DEFAULTS.tune_train_samples,
        tune_algorithm: str = DEFAULTS.tune_algorithm,
        tune_hyperband_factor: int = DEFAULTS.tune_hyperband_factor,
        tune_fine_tune_trials: int = DEFAULTS.tune_fine_tune_trials,
        batch_size: int = DEFAULTS.batch_size,
        max_per_split: int = DEFAULTS.max_per_split,
        seed: int = DEFAULTS.seed,
        select_metric: str = DEFAULTS.select_metric,
        ensemble_k: int = DEFAULTS.ensemble_k,
        external_data: str = DEFAULTS.external_data,
        class_map: str = DEFAULTS.class_map,
        target_sensitivity: float = DEFAULTS.target_sensitivity,
        threshold_rule: str = DEFAULTS.threshold_rule,
        data_version: str = DEFAULTS.data_version,
        champion_uri: str = DEFAULTS.champion_uri,
        promotion_margin: float = DEFAULTS.promotion_margin,
        robustness: bool = DEFAULTS.robustness,
        robustness_samples: int = DEFAULTS.robustness_samples,
        tta: bool = DEFAULTS.tta,
        deployment_prevalence: float = DEFAULTS.deployment_prevalence,
        target_data: str = DEFAULTS.target_data,
    ) -> dsl.HTML:
        prep = ops.preprocess(source=data_source, image_size=image_size, seed=seed,
                              max_per_split=max_per_split, data_version=data_version,
                              skip_bad=skip_bad, keep_aspect=keep_aspect,
                              shifted_test_fraction=shifted_test_fraction, sites=sites,
                              holdout_site=holdout_site)
        _apply(prep, platform, heavy=False)
        dataset = prep.outputs["dataset"]
        with dsl.ParallelFor(base_models, parallelism=parallelism, name="per-model") as name:
            tune = ops.tune(dataset=dataset, model_name=name, max_trials=tune_trials,
                            epochs=tune_epochs, weights=weights, batch_size=batch_size,
                            seed=seed, train_samples=tune_train_samples,
                            algorithm=tune_algorithm, hyperband_factor=tune_hyperband_factor,
                            fine_tune_trials=tune_fine_tune_trials,
                            state_root=platform.state_root)
            train = ops.train(dataset=dataset, tuning=tune.outputs["tuning"], model_name=name,
                              epochs=epochs, weights=weights, batch_size=batch_size, seed=seed,
                              target_sensitivity=target_sensitivity,
                              threshold_rule=threshold_rule, state_root=platform.state_root)
            # The recipe on K image-statistics folds: out-of-fold predictions, one more split.
            folds = ops.crossfold(dataset=dataset, model=train.outputs["model"],
                                  shift_folds=shift_folds, epochs=epochs)
            evaluate = ops.evaluate(dataset=dataset, model=train.outputs["model"],
                                    folds=folds.outputs["folds"],
                                    external_data=external_data, class_map=class_map,
                                    robustness=robustness,
                                    robustness_samples=robustness_samples, tta=tta,
                                    deployment_prevalence=deployment_prevalence)
            for task, heavy in ((tune, True), (train, True), (folds, True), (evaluate, False)):
                _apply(task, platform, heavy)
        compare = ops.compare(models=dsl.Collected(train.outputs["model"]),
                              evaluations=dsl.Collected(evaluate.outputs["evaluation"]),
                              tunings=dsl.Collected(tune.outputs["tuning"]),
                              select_metric=select_metric, ensemble_k=ensemble_k,
                              target_sensitivity=target_sensitivity,
                              threshold_rule=threshold_rule)
        _apply(compare, platform, heavy=False)
        # Chosen on held-out shift, shipped trained on everything: the pick again, with the
        # carved test_shifted back in (or a copy of the pick when refit is off).
        refit_task = ops.refit(dataset=dataset, best_model=compare.outputs["best_model"],
                               report_in=compare.outputs["report"],
                               summary_in=compare.outputs["summary"],
                               model_card_in=compare.outputs["model_card"], refit=refit,
                               epochs=epochs, external_data=external_data,
                               class_map=class_map)
        _apply(refit_task, platform, heavy=True)
        shipped = refit_task.outputs["model"]
        # Never cached: the champion behind the same champion_uri changes from run to run.
        challenge = ops.challenge(dataset=dataset, best_model=shipped,
                                  model_card=refit_task.outputs["model_card"],
                                  champion_uri=champion_uri,
                                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                  promotion_margin=promotion_margin,
                                  seed=seed).set_caching_options(False)
        _apply(challenge, platform, heavy=False)
        # The pick on the target site's unlabelled images: its prevalence there (EM).
        target = ops.predict(model=shipped, source=target_data,
                             skip_bad=skip_bad).set_display_name("target-prevalence")
        _apply(target, platform, heavy=False)
        with dsl.If(challenge.outputs["Output"] == "promote", name="promote-champion"):
            promote = ops.promote(best_model=shipped,
                                  card=challenge.outputs["card"],
                                  decision=challenge.outputs["decision"],
                                  champion_uri=champion_uri).set_caching_options(False)
            _apply(promote, platform, heavy=False)
        return refit_task.outputs["report"]

    # KFP reads each parameter's help (the Kubeflow UI's) from the docstring's Args.
    lungxray.__doc__ = schema.pipeline_docstring(
        "Tune, train and evaluate each base model, compare them and gate the champion.")
    return dsl.pipeline(name=PIPELINE_NAME,
                        description="Tune, fine-tune and compare Keras Applications models for "
                                    "lung X-ray classification; the best model is chosen on "
                                    "validation.")(lungxray)
