# Cluster side: container images, local clusters, Kubeflow Pipelines install, submit/schedule.
# Included by the top-level Makefile, which defines VENV, PY, the $(VENV)/.installed stamp,
# REGISTRY, TAG, IMAGE, PIPELINE_YAML (and its rule), compile, KFP_HOST, KFP_EXPERIMENT, PARAMS,
# PLATFORM_FLAGS, HEAVY_RESOURCES, LIGHT_RESOURCES, PARALLELISM, IMAGE_DIGEST.
# Walkthrough: docs/cluster.md.

DOCKER   ?= docker
KUBECTL  ?= kubectl
KIND     ?= kind
MINIKUBE ?= minikube
HADOLINT ?= $(VENV)/bin/hadolint

# Images ----------------------------------------------------------------------------------------
# Runtime base of the GPU image. Pin it by digest: TF_GPU_IMAGE=tensorflow/tensorflow:2.21.0-gpu@sha256:...
# (`docker buildx imagetools inspect tensorflow/tensorflow:2.21.0-gpu` prints it).
TF_GPU_IMAGE ?= tensorflow/tensorflow:2.21.0-gpu
# 1: `make image` refuses a TF_GPU_IMAGE without @sha256:<digest> (else it only warns).
REQUIRE_DIGEST ?=
# Both images are linux/amd64: the TensorFlow 2.21.0 wheels (tensorflow-cpu, and the GPU base)
# exist for x86_64 only. Building for it explicitly makes `make image-cpu` work on Apple
# Silicon too (Docker Desktop emulates amd64).
IMAGE_PLATFORM ?= linux/amd64
# Space-separated Keras Applications whose ImageNet weights are baked into the image, for
# clusters without internet access, e.g. PREBAKE_WEIGHTS="VGG16 ResNet152V2 InceptionV3".
PREBAKE_WEIGHTS ?=
# The CPU image gets its own tag: KFP caches steps on the image string, so two different images
# must never share one.
IMAGE_CPU ?= $(REGISTRY)/lungxray:$(TAG)-cpu
# Package compiled for IMAGE_CPU without GPU requests (kind/minikube without GPUs).
PIPELINE_YAML_CPU ?= build/pipeline-cpu.yaml

# Runs ------------------------------------------------------------------------------------------
RUN_NAME ?=
# Run that `make retry` retries (the id at the end of its URL).
RUN_ID ?=
# KFP cron: 6 fields, seconds first, e.g. CRON="0 0 3 * * *" (every day at 03:00:00).
CRON ?=
SCHEDULE_NAME ?= lungxray-scheduled
# Kubernetes SA for the run pods; lungxray-pipeline-runner comes from `make manifests-apply`.
# Empty: KFP's default (pipeline-runner).
KFP_SERVICE_ACCOUNT ?=
# KFP step caching for submit/schedule: on | off | default (as compiled). Empty: submit keeps
# the compiled settings, schedule turns caching off (see pipelines/schedule.py).
KFP_CACHE ?=
# Only for multi-user Kubeflow; KFP standalone is single-user. The profile namespace, and a
# bearer token for its gateway: KFP_TOKEN in the environment (e.g. `kubectl create token
# default-editor -n NS --audience pipelines.kubeflow.org`), KFP_TOKEN_FILE, or KFP_IN_CLUSTER=1
# inside a pod with the projected token at /var/run/secrets/kubeflow/pipelines/token.
KFP_USER_NAMESPACE ?=
KFP_TOKEN_FILE ?=
KFP_IN_CLUSTER ?=
# 1: submit/schedule without asking the registry whether IMAGE exists (registry v2 API HEAD).
# Registry credentials, if it needs any: REGISTRY_USER and REGISTRY_PASSWORD in the environment.
NO_IMAGE_CHECK ?=

# Vertex AI Pipelines ---------------------------------------------------------------------------
PIPELINE_YAML_VERTEX ?= build/pipeline-vertex.yaml
VERTEX_PROJECT ?=
VERTEX_LOCATION ?= us-central1
# gs:// folder for the artifacts of Vertex runs (required).
VERTEX_PIPELINE_ROOT ?=
# Vertex accelerator type of tune/train (NVIDIA_L4, NVIDIA_TESLA_T4, NVIDIA_A100_80GB, ...).
VERTEX_ACCELERATOR ?= NVIDIA_L4
VERTEX_SERVICE_ACCOUNT ?=
# Vertex cron: 5 fields, minutes first (unlike KFP's 6), e.g. VERTEX_CRON="0 3 * * 1".
VERTEX_CRON ?=
# Another API endpoint, e.g. a private one; empty: the region's.
VERTEX_API_ENDPOINT ?=

# Kubeflow Pipelines standalone -----------------------------------------------------------------
# KFP backend release (a tag of kubeflow/pipelines), pinned apart from the SDK: the kfp 2.17.3
# SDK in pyproject.toml talks to 2.17.x backends, but the backend has no 2.17.3 tag; 2.17.0 is
# its newest 2.17 release tag.
KFP_BACKEND_VERSION ?= 2.17.0
# platform-agnostic: no cloud-specific parts (env/dev adds GCP's proxy agent, which crash-loops
# on kind/minikube); the KFP install docs suggest it for exactly that case.
KFP_ENV ?= platform-agnostic
KFP_NAMESPACE ?= kubeflow
KFP_WAIT_TIMEOUT ?= 15m
# Local port of `make kfp-port-forward`; keep it equal to the port in KFP_HOST.
KFP_UI_PORT ?= 8080
KFP_MANIFESTS := github.com/kubeflow/pipelines/manifests/kustomize

# Manifests and local clusters ------------------------------------------------------------------
OVERLAY ?= kind
MANIFESTS_OUT ?= build/manifests
OVERLAYS := $(patsubst manifests/overlays/%/kustomization.yaml,%,$(wildcard manifests/overlays/*/kustomization.yaml))
KIND_CLUSTER ?= lungxray
KIND_CONFIG ?= manifests/kind/cluster.yaml
# Registry container next to kind (kind "Local Registry" guide); pushes go to localhost:PORT.
KIND_REGISTRY_NAME ?= kind-registry
KIND_REGISTRY_PORT ?= 5001
KIND_REGISTRY_IMAGE ?= registry:3
MINIKUBE_PROFILE ?= lungxray
MINIKUBE_K8S_VERSION ?= v1.35.8
# On a Linux host with an NVIDIA GPU and its container toolkit, add --driver=docker --gpus=all
# (minikube then runs the NVIDIA device plugin) and use the GPU image and package.
MINIKUBE_FLAGS ?= --cpus=4 --memory=8g --disk-size=40g
# Image that kind-load / minikube-load copy into the cluster nodes.
LOAD_IMAGE ?= $(IMAGE_CPU)

# Arguments shared by submit and schedule; $(1) = package, $(2) = image it must reference.
kfp_auth_args = $(if $(KFP_USER_NAMESPACE),--namespace '$(KFP_USER_NAMESPACE)') \
	$(if $(KFP_TOKEN_FILE),--token-file '$(KFP_TOKEN_FILE)') $(if $(KFP_IN_CLUSTER),--in-cluster)
kfp_run_args = --host '$(KFP_HOST)' --experiment '$(KFP_EXPERIMENT)' --package $(1) \
	--expect-image '$(2)' $(if $(PARAMS),--params '$(PARAMS)') \
	$(if $(CHAMPION_URI),--set 'champion_uri=$(CHAMPION_URI)') \
	$(if $(KFP_SERVICE_ACCOUNT),--service-account '$(KFP_SERVICE_ACCOUNT)') \
	$(if $(KFP_CACHE),--cache '$(KFP_CACHE)') $(if $(NO_IMAGE_CHECK),--no-image-check) \
	$(kfp_auth_args)
vertex_args = --project '$(VERTEX_PROJECT)' --location '$(VERTEX_LOCATION)' \
	--pipeline-root '$(VERTEX_PIPELINE_ROOT)' --package $(PIPELINE_YAML_VERTEX) \
	--expect-image '$(IMAGE)' $(if $(PARAMS),--params '$(PARAMS)') \
	$(if $(VERTEX_SERVICE_ACCOUNT),--service-account '$(VERTEX_SERVICE_ACCOUNT)') \
	$(if $(KFP_CACHE),--cache '$(KFP_CACHE)') $(if $(NO_IMAGE_CHECK),--no-image-check) \
	$(if $(VERTEX_API_ENDPOINT),--api-endpoint '$(VERTEX_API_ENDPOINT)')

# Checked when make reads the file, so a missing CRON fails before anything is compiled.
ifneq ($(filter schedule,$(MAKECMDGOALS)),)
ifeq ($(strip $(CRON)),)
$(error CRON is required for schedule: 6 fields, seconds first, e.g. CRON="0 0 3 * * *")
endif
endif
ifneq ($(filter submit-vertex schedule-vertex,$(MAKECMDGOALS)),)
ifeq ($(strip $(VERTEX_PROJECT)),)
$(error VERTEX_PROJECT is required for Vertex AI, e.g. VERTEX_PROJECT=my-project)
endif
ifeq ($(filter gs://%,$(VERTEX_PIPELINE_ROOT)),)
$(error VERTEX_PIPELINE_ROOT must be a gs:// folder for the run artifacts, e.g. gs://my-bucket/pipelines)
endif
endif
ifneq ($(filter schedule-vertex,$(MAKECMDGOALS)),)
ifeq ($(strip $(VERTEX_CRON)),)
$(error VERTEX_CRON is required for schedule-vertex: 5 fields, e.g. VERTEX_CRON="0 3 * * 1")
endif
endif

.PHONY: image image-cpu push push-cpu lint-docker compile-cpu submit submit-cpu schedule \
	unschedule retry compile-vertex submit-vertex schedule-vertex kind-up kind-down kind-load minikube-up minikube-load kfp-install kfp-port-forward manifests \
	manifests-apply

# Images ----------------------------------------------------------------------------------------
image: ## Build the GPU image IMAGE (TF_GPU_IMAGE base, PREBAKE_WEIGHTS="VGG16 ..." bakes ImageNet weights in)
	@git diff --quiet HEAD -- 2>/dev/null || echo "warning: uncommitted changes are in $(IMAGE) but not in commit $(TAG)" >&2
	@case '$(TF_GPU_IMAGE)' in *@sha256:????????????????????????????????????????????????????????????????) ;; \
	*) if [ -n '$(REQUIRE_DIGEST)' ]; then \
		echo "error: TF_GPU_IMAGE=$(TF_GPU_IMAGE) is not pinned by digest (REQUIRE_DIGEST is set); use <image>:<tag>@sha256:<64 hex>" >&2; exit 2; \
	else echo "warning: TF_GPU_IMAGE=$(TF_GPU_IMAGE) is pinned by tag only; pass @sha256:<digest>" >&2; fi;; esac
	$(DOCKER) build --platform $(IMAGE_PLATFORM) -f docker/Dockerfile \
		--build-arg TF_GPU_IMAGE=$(TF_GPU_IMAGE) --build-arg PREBAKE_WEIGHTS="$(PREBAKE_WEIGHTS)" \
		--build-arg VCS_REF=$(TAG) -t $(IMAGE) .

image-cpu: ## Build the CPU-only image IMAGE_CPU for linux/amd64 (kind, minikube, CI; also on Apple Silicon)
	@git diff --quiet HEAD -- 2>/dev/null || echo "warning: uncommitted changes are in $(IMAGE_CPU) but not in commit $(TAG)" >&2
	$(DOCKER) build --platform $(IMAGE_PLATFORM) -f docker/Dockerfile.cpu \
		--build-arg PREBAKE_WEIGHTS="$(PREBAKE_WEIGHTS)" --build-arg VCS_REF=$(TAG) -t $(IMAGE_CPU) .

push: ## Push IMAGE to its registry
	$(DOCKER) push $(IMAGE)

push-cpu: ## Push IMAGE_CPU to its registry
	$(DOCKER) push $(IMAGE_CPU)

lint-docker: $(VENV)/.installed ## hadolint both Dockerfiles (fails on warnings)
	$(HADOLINT) --failure-threshold warning docker/Dockerfile docker/Dockerfile.cpu

# Runs ------------------------------------------------------------------------------------------
compile-cpu: $(VENV)/.installed ## Compile build/pipeline-cpu.yaml for IMAGE_CPU without GPU requests (GCS_SECRET, CACHE_PVC, PARALLELISM, *_RESOURCES)
	$(PY) -m pipelines.compile --no-gpu --image $(IMAGE_CPU) --output $(PIPELINE_YAML_CPU) \
		$(PLATFORM_FLAGS)

compile-vertex: $(VENV)/.installed ## Compile build/pipeline-vertex.yaml for Vertex AI (IMAGE, VERTEX_ACCELERATOR, GPUS, PARALLELISM, *_RESOURCES)
	$(PY) -m pipelines.compile --image $(IMAGE) --output $(PIPELINE_YAML_VERTEX) \
		--vertex-accelerator $(VERTEX_ACCELERATOR) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(PARALLELISM),--parallelism $(PARALLELISM)) \
		$(if $(HEAVY_RESOURCES),--heavy-resources=$(HEAVY_RESOURCES)) \
		$(if $(LIGHT_RESOURCES),--light-resources=$(LIGHT_RESOURCES)) \
		$(if $(IMAGE_DIGEST),--image-digest $(IMAGE_DIGEST))

submit-vertex: compile-vertex ## Run the pipeline on Vertex AI Pipelines (VERTEX_PROJECT, VERTEX_PIPELINE_ROOT, PARAMS)
	$(PY) -m pipelines.vertex submit $(vertex_args) $(if $(RUN_NAME),--run-name '$(RUN_NAME)')

schedule-vertex: compile-vertex ## Vertex AI schedule SCHEDULE_NAME; needs VERTEX_CRON="0 3 * * 1" (5 fields)
	$(PY) -m pipelines.vertex schedule $(vertex_args) --cron '$(VERTEX_CRON)' \
		--name '$(SCHEDULE_NAME)'

submit: $(PIPELINE_YAML) $(VENV)/.installed ## Run build/pipeline.yaml on KFP_HOST (KFP_EXPERIMENT, PARAMS, RUN_NAME)
	$(PY) -m pipelines.submit $(call kfp_run_args,$(PIPELINE_YAML),$(IMAGE)) \
		$(if $(RUN_NAME),--run-name '$(RUN_NAME)')

submit-cpu: compile-cpu ## Run the CPU package (IMAGE_CPU, no GPU requests) on KFP_HOST, e.g. kind
	$(PY) -m pipelines.submit $(call kfp_run_args,$(PIPELINE_YAML_CPU),$(IMAGE_CPU)) \
		$(if $(RUN_NAME),--run-name '$(RUN_NAME)')

schedule: $(PIPELINE_YAML) $(VENV)/.installed ## Create recurring run SCHEDULE_NAME; needs CRON="0 0 3 * * *" (6 fields)
	$(PY) -m pipelines.schedule create $(call kfp_run_args,$(PIPELINE_YAML),$(IMAGE)) \
		--cron '$(CRON)' --name '$(SCHEDULE_NAME)'

retry: $(VENV)/.installed ## Retry the failed run RUN_ID (resets failed steps; with CACHE_PVC tune/train resume)
	@test -n '$(RUN_ID)' || { echo "RUN_ID is required: the id at the end of the run's URL" >&2; exit 2; }
	$(PY) -m pipelines.retry --host '$(KFP_HOST)' '$(RUN_ID)' $(kfp_auth_args)

unschedule: $(VENV)/.installed ## Disable the recurring run(s) named SCHEDULE_NAME (or an id)
	$(PY) -m pipelines.schedule disable --host '$(KFP_HOST)' --name '$(SCHEDULE_NAME)' \
		$(kfp_auth_args)

# Local clusters --------------------------------------------------------------------------------
# kind-up follows kind's "Local Registry" guide: registry container, cluster, a containerd
# hosts.toml per node mapping localhost:PORT to the container, network link, and the
# local-registry-hosting ConfigMap.
kind-up: ## Create kind cluster KIND_CLUSTER plus a local registry (localhost:KIND_REGISTRY_PORT)
	@if [ "$$($(DOCKER) inspect -f '{{.State.Running}}' $(KIND_REGISTRY_NAME) 2>/dev/null)" != true ]; then \
		$(DOCKER) run -d --restart=always -p 127.0.0.1:$(KIND_REGISTRY_PORT):5000 --network bridge \
			--name $(KIND_REGISTRY_NAME) $(KIND_REGISTRY_IMAGE); \
	fi
	@if $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
		echo "kind cluster $(KIND_CLUSTER) already exists"; \
	else \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config $(KIND_CONFIG); \
	fi
	@for node in $$($(KIND) get nodes --name $(KIND_CLUSTER)); do \
		$(DOCKER) exec $$node mkdir -p /etc/containerd/certs.d/localhost:$(KIND_REGISTRY_PORT); \
		printf '[host."http://%s:5000"]\n' $(KIND_REGISTRY_NAME) | $(DOCKER) exec -i $$node \
			cp /dev/stdin /etc/containerd/certs.d/localhost:$(KIND_REGISTRY_PORT)/hosts.toml; \
	done
	@if [ "$$($(DOCKER) inspect -f '{{json .NetworkSettings.Networks.kind}}' $(KIND_REGISTRY_NAME))" = null ]; then \
		$(DOCKER) network connect kind $(KIND_REGISTRY_NAME); \
	fi
	$(KUBECTL) --context kind-$(KIND_CLUSTER) apply -f manifests/kind/local-registry-hosting.yaml

kind-down: ## Delete kind cluster KIND_CLUSTER (the registry container and its images stay)
	$(KIND) delete cluster --name $(KIND_CLUSTER)

kind-load: ## Copy LOAD_IMAGE (default IMAGE_CPU) into the kind nodes, instead of a push
	$(KIND) load docker-image $(LOAD_IMAGE) --name $(KIND_CLUSTER)

minikube-up: ## Start minikube profile MINIKUBE_PROFILE sized for KFP (MINIKUBE_FLAGS)
	$(MINIKUBE) start --profile $(MINIKUBE_PROFILE) --kubernetes-version $(MINIKUBE_K8S_VERSION) \
		$(MINIKUBE_FLAGS)

minikube-load: ## Copy LOAD_IMAGE (default IMAGE_CPU) into the minikube node, instead of a push
	$(MINIKUBE) --profile $(MINIKUBE_PROFILE) image load $(LOAD_IMAGE)

# Kubeflow Pipelines ----------------------------------------------------------------------------
kfp-install: ## Install Kubeflow Pipelines standalone KFP_BACKEND_VERSION (KFP_ENV) into the current kube context
	$(KUBECTL) apply -k "$(KFP_MANIFESTS)/cluster-scoped-resources?ref=$(KFP_BACKEND_VERSION)"
	$(KUBECTL) wait --for condition=established --timeout=60s crd/applications.app.k8s.io
	$(KUBECTL) apply -k "$(KFP_MANIFESTS)/env/$(KFP_ENV)?ref=$(KFP_BACKEND_VERSION)"
	$(KUBECTL) -n $(KFP_NAMESPACE) wait --for=condition=Available --timeout=$(KFP_WAIT_TIMEOUT) deployment --all

kfp-port-forward: ## Forward the KFP UI and API to localhost:KFP_UI_PORT (blocks; Ctrl-C stops)
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80

# Manifests -------------------------------------------------------------------------------------
manifests: ## Render every overlay of manifests/overlays/ into MANIFESTS_OUT/<overlay>.yaml
	@mkdir -p $(MANIFESTS_OUT)
	@set -e; for overlay in $(OVERLAYS); do \
		$(KUBECTL) kustomize manifests/overlays/$$overlay > $(MANIFESTS_OUT)/$$overlay.yaml; \
		echo "$(MANIFESTS_OUT)/$$overlay.yaml"; \
	done

manifests-apply: ## kubectl apply the OVERLAY overlay (SA, RoleBinding, cache PVC) next to KFP
	$(KUBECTL) apply -k manifests/overlays/$(OVERLAY)
