# sq-pt2e: `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
TTS_STAMP := $(VENV)/.tts-engines
# A local CPU build of torch 2.13.0 is used when the machine carries one (about 200 MB
# instead of the ~3 GB CUDA build); otherwise pip takes torch from the package index.
LOCAL_TORCH := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
# Test processes (pytest-xdist; one test file per process, so module fixtures are built once).
# Most tests run one thread, so two processes keep two cores busy; TEST_WORKERS=0 runs in one.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup demo test test-all bench clean

setup: $(STAMP) $(TTS_STAMP)

# The TTS engines of the synthetic corpus (apt-get, when missing and allowed; never fails).
$(TTS_STAMP): scripts/install_tts_engines.sh | $(STAMP)
	bash scripts/install_tts_engines.sh
	touch $(TTS_STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(LOCAL_TORCH),$(LOCAL_TORCH),torch==2.13.0)
	$(PIP) install -q -c requirements.lock -e '.[dev,ray]'
	touch $(STAMP)

demo: setup
	$(PY) examples/quantize_and_compare.py

test: setup
	$(PYTEST)

test-all: setup
	$(PYTEST) -m ""

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
