# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The pinned CPU torch lies on local disk (/opt/wheels); an unpinned torch would pull CUDA builds.
TORCH_VERSION ?= 2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# The Docker images' pinned requirements, generated from pyproject.toml's extras (deploy/docker/requirements.py).
REQUIREMENTS := deploy/docker/requirements-gateway.txt deploy/docker/requirements-worker.txt

.PHONY: install test lint format demo bench bench-quick clean services requirements

# torch first (pinned, CPU), then, in one resolve, the project with its dev extras (gateway, worker and the test
# tools) at the versions the images pin, so the tests run what the images ship, and the Python SDK (sdk/python),
# which the `krona` client commands use for every HTTP call.
define make_venv
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) "torch==$(TORCH_VERSION)"
	$(PIP) install -q $(FIND_LINKS) $(addprefix -r ,$(REQUIREMENTS)) -e ".[$(1)]" -e "sdk/python[images]"
	touch $@
endef

$(VENV)/.installed: pyproject.toml sdk/python/pyproject.toml $(REQUIREMENTS)
	$(call make_venv,dev)

# What the demo needs (the service and the SDK) without the test tools, for a first `make demo` (they are a fifth
# of the install); `make install` or `make test` adds them to the same .venv later.
$(VENV)/.service-installed: pyproject.toml sdk/python/pyproject.toml $(REQUIREMENTS)
	$(call make_venv,gateway$(comma)worker)

comma := ,

install: $(VENV)/.installed

# After changing pyproject.toml's dependencies or installing another version of one: rewrite the pins.
requirements:
	$(PY) deploy/docker/requirements.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The integration tests need PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379); start
# them if they are down. SeaweedFS (S3) is started by the tests themselves (tests/helpers/services.py).
services:
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""
	@pg_isready -h 127.0.0.1 -p 5432 -t 30 >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
	@command -v kubectl >/dev/null || apt-get install -y -q kubernetes-client
	@# The web console's browser test drives Debian's Chromium (never a browser a test tool downloads).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

# Three pytest-xdist processes: most tests wait on services, workers and stacks, so three beat one even on 2 cores
# (the parallel phase on the 2-core VM, 2026-12-04: 373-476 s with -n 3, 486 s with -n 2, 448 s with -n 4; `make
# test TEST_WORKERS=0` runs them in this process). tests/conftest.py gives every test process one OpenMP thread (the
# parallel phase: 840 s -> 532 s on a slow day), and tests/helpers/order.py hands out the longest files first. Each
# process has its own databases, Redis database, S3 server and ports. The tests marked
# `serial` (hundreds of concurrent connections, or a measurement under load) run afterwards, alone: in parallel,
# three processes' pools can exhaust PostgreSQL's 100 connections. `--dist loadfile`: a file's tests run in one
# process, in order, sharing its module fixtures (some build on the one before, e.g. test_sdk.py's stack).
TEST_WORKERS ?= 3
test: install lint services
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=15
	$(PY) -m pytest -q -m serial --durations=5

demo: $(if $(wildcard $(VENV)/.installed),$(VENV)/.installed,$(VENV)/.service-installed)
	$(VENV)/bin/krona demo --out out/demo
	@echo
	@echo "Next: put krona on your PATH and run the service yourself (README: Running the service):"
	@echo "  source $(VENV)/bin/activate"
	@echo "  krona up"

bench: install
	$(PY) benchmarks/adapter_ops.py --json benchmarks/results/adapter_ops.json

bench-quick: install
	$(PY) benchmarks/adapter_ops.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
