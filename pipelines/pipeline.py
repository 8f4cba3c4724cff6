"""The lungxray DAG: preprocess -> ParallelFor(base models){tune -> train -> evaluate} -> compare.

Only the graph lives here; everything that reads parameter values runs inside components.
"""


from collections.abc import Callable
from dataclasses import dataclass

from kfp import dsl

import components
from lungxray.artifacts import DEFAULT_ENSEMBLE_K, DEFAULT_SELECT_METRIC

PIPELINE_NAME = "lungxray"
# SmallCNN: the from-scratch baseline that says whether transfer learning earns its cost.
DEFAULT_MODELS = ["VGG16", "ResNet152V2", "InceptionV3", "SmallCNN"]
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
    heavy: Resources = Resources()  # tune and train
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
    state volume on the heavy ones (tune, train)."""
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

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Tune, fine-tune and compare Keras Applications models for lung "
                              "X-ray classification; the best model is chosen on validation.")
    def lungxray(
        data_source: str = "pneumoniamnist",
        sites: str = "",
        holdout_site: str = "",
        base_models: list = DEFAULT_MODELS,  # noqa: B006 - KFP reads the default from here
        image_size: int = 0,
        keep_aspect: bool = False,
        skip_bad: bool = False,
        shifted_test_fraction: float = 0.1,
        weights: str = "imagenet",
        epochs: int = 6,
        tune_trials: int = 3,
        tune_epochs: int = 2,
        tune_train_samples: int = 0,
        tune_algorithm: str = "hyperband",
        tune_hyperband_factor: int = 3,
        tune_fine_tune_trials: int = 2,
        batch_size: int = 32,
        max_per_split: int = 0,
        seed: int = 42,
        select_metric: str = DEFAULT_SELECT_METRIC,
        ensemble_k: int = DEFAULT_ENSEMBLE_K,
        external_data: str = "",
        class_map: str = "",
        target_sensitivity: float = 0.0,
        data_version: str = "",
        champion_uri: str = "",
        promotion_margin: float = 0.0,
        robustness: bool = True,
        robustness_samples: int = 500,
        tta: bool = False,
        deployment_prevalence: float = 0.0,
        target_data: str = "",
    ) -> dsl.HTML:
        """Tune, train and evaluate each base model, compare them and gate the champion.

        Args:
            data_source: MedMNIST-style .npz, image folder, CSV manifest, a gs:// URI of any of
                them, or pneumoniamnist (downloaded and checksummed).
            sites: More sources prepared into the same splits, NAME=SOURCE,... (e.g.
                nih=../shared/data/nih_cxr_1000/manifest.csv); each is carved on its own,
                grouped by patient, and scored per site. data_source is the site named
                pneumoniamnist for its files, else main. Empty = one site.
            holdout_site: A site whose images all go to test_site_<name>: never trained,
                tuned, thresholded or selected on, the off-site estimate. Empty = none.
            base_models: Keras Applications names or SmallCNN (the from-scratch baseline); one
                trial each.
            image_size: Side in pixels of the prepared images; 0 keeps the npz size (224 for
                folders).
            keep_aspect: Pad images to square instead of stretching them.
            skip_bad: Leave unusable image files out and list them, instead of failing.
            shifted_test_fraction: Share of train held out as test_shifted, whole clusters of
                image statistics: the shift proxy, never trained or chosen on; 0 = none.
            weights: imagenet, none (from scratch) or a local or gs:// weights file.
            epochs: Training epochs; pretrained: half head, half fine-tuning.
            tune_trials: keras-tuner trials per model.
            tune_epochs: Epochs per tuning trial.
            tune_train_samples: Fit each trial on a stratified subset of N training images; 0 =
                all.
            tune_algorithm: keras-tuner search: hyperband, bayesian or random.
            tune_hyperband_factor: Hyperband's reduction factor.
            tune_fine_tune_trials: Pretrained weights: full-model trials searching the fine-tune
                settings.
            batch_size: Batch size.
            max_per_split: Keep at most N images per split, stratified; 0 = all.
            seed: Seed for splits, subsets, initialisation and tuning.
            select_metric: Validation metric that picks the best model (val_*; test_* is
                refused).
            ensemble_k: The ensemble candidate averages the top-k models; 0 or 1 = none.
            external_data: Another labelled dataset every trial is also evaluated on; empty =
                none.
            class_map: Maps the external set's class names to the model's, e.g.
                COVID-19=pneumonia,NORMAL=normal (- drops a class).
            target_sensitivity: 0 = threshold by Youden's J on val; else the highest threshold
                whose val sensitivity reaches it.
            data_version: Not read; part of the cache key: change it when the data behind
                data_source changes.
            champion_uri: Folder or gs:// prefix of the model in use; empty = no
                champion/challenger.
            promotion_margin: The pick replaces the champion only if its val AUC is higher by
                more than this, with 95% confidence.
            robustness: Evaluate every split under the seeded acquisition-shift corruption suite.
            robustness_samples: Stratified images per split for the corruption suite; 0 = all.
            tta: Also report the AUC with test-time augmentation.
            deployment_prevalence: 0 = none; else the Bayes threshold and PPV/NPV at this
                prevalence, from val-calibrated scores.
            target_data: Unlabelled images of the site the model will serve (folder, CSV, npz
                or gs://); the pick predicts them and estimates their prevalence by EM, with
                the threshold it implies; empty = none.
        """
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
                              state_root=platform.state_root)
            evaluate = ops.evaluate(dataset=dataset, model=train.outputs["model"],
                                    external_data=external_data, class_map=class_map,
                                    robustness=robustness,
                                    robustness_samples=robustness_samples, tta=tta,
                                    deployment_prevalence=deployment_prevalence)
            for task, heavy in ((tune, True), (train, True), (evaluate, False)):
                _apply(task, platform, heavy)
        compare = ops.compare(models=dsl.Collected(train.outputs["model"]),
                              evaluations=dsl.Collected(evaluate.outputs["evaluation"]),
                              tunings=dsl.Collected(tune.outputs["tuning"]),
                              select_metric=select_metric, ensemble_k=ensemble_k,
                              target_sensitivity=target_sensitivity)
        _apply(compare, platform, heavy=False)
        # Never cached: the champion behind the same champion_uri changes from run to run.
        challenge = ops.challenge(dataset=dataset, best_model=compare.outputs["best_model"],
                                  model_card=compare.outputs["model_card"],
                                  champion_uri=champion_uri,
                                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                  promotion_margin=promotion_margin,
                                  seed=seed).set_caching_options(False)
        _apply(challenge, platform, heavy=False)
        # The pick on the target site's unlabelled images: its prevalence there (EM).
        target = ops.predict(model=compare.outputs["best_model"], source=target_data,
                             skip_bad=skip_bad).set_display_name("target-prevalence")
        _apply(target, platform, heavy=False)
        with dsl.If(challenge.outputs["Output"] == "promote", name="promote-champion"):
            promote = ops.promote(best_model=compare.outputs["best_model"],
                                  card=challenge.outputs["card"],
                                  decision=challenge.outputs["decision"],
                                  champion_uri=champion_uri).set_caching_options(False)
            _apply(promote, platform, heavy=False)
        return compare.outputs["report"]

    return lungxray
