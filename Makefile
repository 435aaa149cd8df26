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

# Browser tests need Debian's chromium; install it when we can (root), else they skip locally.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: browser tests will skip"; }

# The telemetry test watches ONNX Runtime's network calls with strace; install it when root.
.PHONY: strace
strace:
	@command -v strace >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null) \
	  || echo "strace not installed: the telemetry test will skip"; }

# The audit-trail tests run a throwaway PostgreSQL cluster from Debian's package; install it
# when we can (root), else those tests skip locally (and fail under CI=true).
.PHONY: postgresql
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "postgresql not installed: PostgreSQL audit tests will skip"; }

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# The PACS round-trip tests start a real Orthanc with its DICOMweb plugin.
.PHONY: orthanc
orthanc:
	@command -v Orthanc >/dev/null 2>&1 && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null) \
	  || echo "Orthanc not installed: PACS tests will skip"; }

test: setup chromium strace orthanc postgresql lint
	$(BIN)/pytest -q; status=$$?; [ $$status -eq 5 ] && echo "no tests collected" && exit 0; exit $$status
