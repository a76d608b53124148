# `make demo` rewrites the trained reference model and generates text with it and the original (CPU is fine);
# `make test` runs the test suite (CPU, Triton interpreter).
PYTHON ?= python3
# The CPU build of torch this kind of machine keeps on disk; any torch >= 2.4 works.
TORCH_SPEC ?= torch==2.13.0
STAMP := .install.stamp

.PHONY: install test demo gpu-test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q -ra tests

demo: install
	$(PYTHON) -m swa_rewrite demo

gpu-test:
	$(PYTHON) -m pytest -q -ra -m gpu tests

clean:
	rm -f $(STAMP)
