# `make demo` and `make test` each set up .venv on first use (and again when pyproject.toml changes).
#
# torch is installed first, pinned: torch==2.13.0 is the CPU build these machines serve locally. Were pip to
# resolve torch from pyproject's `torch>=2.4` instead, it would pull a multi-GB CUDA build. The pin also goes
# into the second install, so that resolution can never move it.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.vlmforge-installed

.PHONY: demo test clean-venv

demo: $(STAMP)
	$(VENV)/bin/vlmforge demo --output-dir demo_checkpoint

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# The stamp is newer than pyproject.toml once both installs succeeded; a changed pyproject.toml reinstalls.
$(STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install "$(TORCH)"
	$(VENV_PYTHON) -m pip install "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
