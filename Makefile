# Two commands for a fresh machine (see README.md):
#   make book   install what the book needs, execute every notebook (quick mode), write _build/html
#   make test   install what the tests need, run unit tests + nbval + pairing/export checks
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# On a machine without an NVIDIA GPU, install the CPU build of torch first, from PyTorch's CPU
# wheel index (a plain `torch` from PyPI is the multi-GB CUDA build on Linux). Where that index
# cannot be reached, pip looks for the same pinned build in its configured indexes and
# find-links. Override with `make TORCH_SPEC=... TORCH_INDEX=... test`.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: book test export check notebooks clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	  then $(PIP) install "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)" --extra-index-url https://pypi.org/simple; \
	  else echo "$(TORCH_INDEX) not reachable: installing $(TORCH_SPEC) from pip's configured sources"; \
	       $(PIP) install "$(TORCH_SPEC)"; fi; fi
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.book: $(VENV)/.base
	$(PIP) install -e ".[book]"
	touch $@

test: $(VENV)/.test
	$(VENV)/bin/pytest

book: $(VENV)/.book
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going

# authoring helpers
export: $(VENV)/.test
	$(PY) tools/nbtools.py export

check: $(VENV)/.test
	$(PY) tools/nbtools.py check

notebooks: $(VENV)/.test
	$(PY) tools/nbtools.py execute

clean:
	rm -rf _build
