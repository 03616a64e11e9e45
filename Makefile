# detectord: the two commands a user needs are `make run` and `make test`.
# Every target is idempotent: run it again and it does only what is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= detectord.example.yml

.PHONY: run test test-fast test-e2e check format venv venv-dev system-deps coredns compliance kube-tools container-deps image image-cuda proto bench models data clean

# Install the package (with its CPU backend, JAX) and serve the shipped default model.
run: venv
	$(BIN)/detectord serve --config.file $(CONFIG)

# Install everything the tests need (Debian packages, CoreDNS, Python packages) and run them all.
test: venv-dev system-deps coredns compliance kube-tools container-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# Unit and component tests only (no CoreDNS build, no end-to-end run).
test-fast: venv-dev
	$(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

test-e2e: venv-dev system-deps coredns compliance kube-tools container-deps
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

# Formatting, lint, types (mypy --strict on the package, the lab, the tests and bench) and the
# layering contracts (import-linter, see pyproject.toml). CI runs it before the tests.
check: venv-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Rewrite the tree as `make check` wants it (ruff format, then the lint fixes ruff can make).
format: venv-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The daemon alone (`make run`), or with what training, evaluation and the tests need.
venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml setup.py detectord/ingest/_fastdecode.c detectord/ingest/_fastfeatures.c detectord/serve/_fastexports.c detectord/serve/_hugepages.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[tf,train,test]'
	touch $@

system-deps:
	scripts/install-system-deps.sh

coredns:
	scripts/build-coredns.sh

# The remote-write 2.0 receiver compliance suite (prometheus/compliance), pinned, from the Go module proxy.
compliance:
	scripts/build-compliance.sh

# kustomize, psscheck (the real restricted Pod Security checks), the pinned Kubernetes OpenAPI
# spec and prometheus-operator CRDs: what tests/deploy validates the manifests with.
kube-tools:
	scripts/install-kube-tools.sh

# podman, runc and mmdebstrap from Debian (tests/deploy/test_container.py builds and runs the image).
container-deps:
	scripts/install-container-deps.sh

# The container image docker.io/detectord/detectord:VERSION and :latest (podman, a Debian base by
# mmdebstrap, this checkout's wheel). image-cuda: the JAX-on-CUDA variant, several GB, on request only.
image: venv container-deps
	scripts/build-image.sh

image-cuda: venv container-deps
	scripts/build-image.sh Containerfile.cuda

# Regenerate detectord/ingest/_proto from proto/ (tests/test_proto.py fails when it is stale).
proto: venv-dev
	PATH=$(BIN):$$PATH scripts/gen-proto.sh

# Train the three detectors on the committed lab data, evaluate them beside the comparisons and
# make the best the default: models/{conv_autoencoder,conv_classifier,siamese,default,report}.
models: venv-dev system-deps
	KERAS_BACKEND=tensorflow $(BIN)/detectord train --data data --out models

# Re-record the committed data sets (about 6 hours): the normal run and the low-load test fleet
# beside the four fault runs, the other test-only fleets two at a time (path RTT and NXDOMAIN
# share, small and large caches, node-local caches and query mix), then the runs that need the
# machine to themselves, one by one: the high-load test fleet, incidents of every length
# (durations), benign changes (benign).
# Each run logs its progress to $(LAB_RUNS)/NAME.log.
LAB_RUNS ?= .cache/lab
LAB_FAULT_RUNS := faults-1 faults-2 faults-3 faults-4
comma := ,
LAB_PAIRED_RUNS := unseen-rtt,unseen-nxdomain unseen-cache-small,unseen-cache-large unseen-nodelocal,unseen-qtypes
LAB_ALONE_RUNS := unseen-high durations benign
LAB_ALL_RUNS := normal $(LAB_FAULT_RUNS) unseen-low $(subst $(comma), ,$(LAB_PAIRED_RUNS)) $(LAB_ALONE_RUNS)
data: venv-dev system-deps coredns
	mkdir -p $(LAB_RUNS)
	set -e; run() { lab/run lab/scenarios/$$1.yaml --out $(LAB_RUNS)/$$1 --progress-interval 60 > $(LAB_RUNS)/$$1.log 2>&1; }; \
	  run normal & normal=$$!; run unseen-low & low=$$!; \
	  for r in $(LAB_FAULT_RUNS); do run $$r; done; wait $$normal; wait $$low; \
	  for pair in $(LAB_PAIRED_RUNS); do run $${pair%,*} & a=$$!; run $${pair#*,}; wait $$a; done; \
	  for r in $(LAB_ALONE_RUNS); do run $$r; done
	PYTHONPATH=. $(BIN)/python -m lab.dataset publish $(addprefix $(LAB_RUNS)/,$(LAB_ALL_RUNS)) --to data
	PYTHONPATH=. $(BIN)/python -m lab.dataset readme data

bench: venv-dev system-deps
	$(BIN)/python bench/ingest_inference.py --instances 1000

clean:
	rm -rf $(VENV) .cache build *.egg-info
