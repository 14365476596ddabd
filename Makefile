# Two commands on a fresh machine: `make demo` and `make test`. Each builds the virtualenv it needs.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, alone: the project's range then keeps it instead of pulling the newest CUDA
# build (several GB). Override on a GPU machine, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make demo STORE=s3: the same pipeline against a local S3 server (SeaweedFS on 127.0.0.1).
STORE ?= local
DEMO_OUT := demo-out$(if $(filter s3,$(STORE)),-s3)

.PHONY: venv tools test lint format demo bench clean help

help:
	@echo "make demo   - run the end-to-end demo on the embedded default (CPU, local store; STORE=s3: local S3)"
	@echo "make test   - run the test suite"
	@echo "make lint   - ruff check + format check"
	@echo "make bench  - run the benchmarks in bench/ (writes bench/results/; about 40 minutes on 2 cores)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's Prometheus server and promtool, for the monitoring tests; ffmpeg; Slurm and munge, for the
# tests that start a one-node Slurm cluster (tests/test_slurm.py). Installed when we are root.
tools:
	@missing=""; command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || missing="$$missing slurm-wlm"; \
	command -v munged >/dev/null || [ -x /usr/sbin/munged ] || missing="$$missing munge"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note:$$missing not installed (apt-get install$$missing); the tests that need them will be skipped"; fi; fi

# pytest exits 5 when it collected no tests: that must fail, never pass by accident.
test: venv tools
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no tests" >&2; exit 1; fi; exit $$rc

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv
	$(BIN)/lvmae info
	$(BIN)/python -m lvmae_cli.demo --out $(DEMO_OUT) --store $(STORE)

# About 40 minutes on the 2-core CPU machines (docs/benchmarks.md); ingest_throughput needs Debian's ffmpeg.
# The ablations run in their quick mode here; the full table: bench/ablations.py (bench/README.md).
bench: venv
	$(BIN)/python bench/fig1_memory.py
	$(BIN)/python bench/plan_check.py
	$(BIN)/python bench/loader_throughput.py
	$(BIN)/python bench/train_step.py --steps 2 --recipes demo_cpu \
	  "vitb_128f:data.batch_size=1,run.precision=fp32" "vitb_128f:run.precision=fp32"
	@if command -v ffmpeg >/dev/null; then $(BIN)/python bench/ingest_throughput.py --tokens; \
	  else echo "ffmpeg not installed: skipping bench/ingest_throughput.py"; fi
	$(BIN)/python bench/ablations.py --quick

clean:
	rm -rf $(VENV) demo-out demo-out-s3 .pytest_cache .ruff_cache
