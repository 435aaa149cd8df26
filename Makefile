# The two commands a newcomer needs:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: setup serve test lint format

$(BIN)/covid-cxr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/covid-cxr

serve: setup
	$(BIN)/covid-cxr serve --port $(PORT)

# Debian packages the tests use: chromium (browser tests), strace (the telemetry test),
# Orthanc with DICOMweb (the PACS round trip), PostgreSQL (the audit trail) and openssl (HTTPS).
# Installed in one go when missing and we are root; otherwise those tests skip locally (and
# fail under CI=true, where a skipped real-system test would prove nothing).
DEBIAN_PACKAGES := chromium strace orthanc orthanc-dicomweb postgresql openssl
.PHONY: system-packages
system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "not installed (their tests skip):" $$missing; fi

LINTED := src tests benchmarks scripts

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: setup
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

test: setup system-packages lint
	$(BIN)/pytest -q; status=$$?; [ $$status -eq 5 ] && echo "no tests collected" && exit 0; exit $$status
