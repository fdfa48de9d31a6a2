# Two commands on a fresh clone (only Python >= 3.11 and make needed):
#   make demo   create .venv, install, fine-tune multilingual-e5-small locally on embedded defaults (no network,
#               15-25 minutes on 2 cores) and print base vs fine-tuned vs BM25; make demo-tiny: the same pipeline on
#               the tiny encoder in about a minute
#   make test   create .venv if needed, run the tests (make test-slow, make test-deepspeed: the slower end-to-end and DeepSpeed ones)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= demo

.PHONY: demo demo-tiny test test-slow test-deepspeed bench bench-ratios quality clean render images docs

# DeepSpeed (the [deepspeed] extra) on CPU, for the tests that run ZeRO-2/3 with gloo, has its own command: it
# is an sdist whose build must see torch (no build isolation), and DS_BUILD_SHM_COMM=1 compiles its CPU
# collective op here, once (~2.5 min on 2 cores; pip caches the wheel), not at each process's first start.
$(STAMP): pyproject.toml constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt -e '.[dev]'
	DS_BUILD_SHM_COMM=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c constraints/dev.txt setuptools 'deepspeed'
	touch $(STAMP)

# exit 3 (the goal missed) is a result the summary reports, not a failed demo
demo: $(STAMP)
	$(BIN)/m3tune bench quality --config configs/demo-e5.yaml --root runs/$(RUN) || [ $$? -eq 3 ]
	@echo "outputs: $(CURDIR)/runs/$(RUN)  (status: $(BIN)/m3tune status --root runs/$(RUN))"

demo-tiny: $(STAMP)
	$(BIN)/m3tune run --root runs/demo-tiny --config configs/demo.yaml
	@echo "outputs: $(CURDIR)/runs/demo-tiny  (status: $(BIN)/m3tune status --root runs/demo-tiny)"

# two workers (pytest-xdist), one thread each; the tests reading the shared demo run stay on one of them
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The DeepSpeed tests left out of `make test` (marked deepspeed_slow: ZeRO-3, resume, unified heads, two
# nodes): each trains 2 gloo processes on both cores, so one worker (~7 minutes; .ci/run runs it)
test-deepspeed: $(STAMP)
	$(BIN)/python -m pytest -m deepspeed_slow

# The end-to-end runs left out of `make test` for time (marked slow: the whole pipeline on S3, the Argo DAG on
# S3, mining from an existing collection and in shards, kill-and-resume rounds, real e5-small equivalences):
# about 12 minutes in two workers; .ci/run runs it
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_generation.py

# m3tune against its peers' strongest configurations, fresh processes in alternating pairs on the same cores
# (benchmarks/ratios.py; makes .venv-peer for sentence-transformers' ONNX backend once). RATIOS="--quick" for
# smaller workloads: 27 minutes on 2 idle cores (2026-12-08; the full form is not timed yet).
bench-ratios: $(STAMP)
	$(BIN)/python benchmarks/ratios.py $(RATIOS)

# Does m3tune make a real model better? The pipeline on multilingual-e5-small (local:e5-small), base vs
# fine-tuned vs BM25 on the gold standard (2 CPU cores; see configs/quality-cpu.yaml).
quality: $(STAMP)
	$(BIN)/m3tune bench quality --config configs/quality-cpu.yaml

# Re-render the generated Kubernetes files from the pipeline definition (a golden test checks they are current).
render: $(STAMP)
	$(BIN)/m3tune render argo --output argo --chart charts/m3tune
	$(BIN)/m3tune render job mine-negatives --root s3://m3tune-runs/runs/exp-01 -o jobs/rerun-mine-negatives.yaml
	$(BIN)/m3tune render job mine-negatives --root s3://m3tune-runs/runs/exp-01 --rank 1 --world-size 4 \
		-o jobs/rerun-mine-negatives-shard.yaml

# The docs site (mkdocs.yml) into site/: the README as its home page, docs/ by task, each step's options
# generated from its config (docs/hooks/options.py). --strict: a broken link or anchor fails the build.
# NO_MKDOCS_2_WARNING: Material prints a banner about its successor at every build, noise in CI's log.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Build and tag both images (needs Docker with buildx): make images REGISTRY=ghcr.io/you [PUSH=--push]
images:
	REGISTRY=$(or $(REGISTRY),m3tune) docker buildx bake -f images/docker-bake.hcl $(PUSH)

clean:
	rm -rf $(VENV) runs .pytest_cache site
