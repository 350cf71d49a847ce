# The two commands a new machine needs:  `make demo`  and  `make test`.
# Everything they need is installed here, into .venv, from pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench models clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[convert,dev,torch]'
	touch $(STAMP)

models: $(STAMP)
	$(PY) -m models

# Build the sample bundles if missing; the fleet pushes digits-edge v2 to a running agent
# (embedded broker, all in-process); then start the agent, send it real images, print answers.
demo: $(STAMP)
	$(PY) -m models --if-missing
	$(VENV)/bin/edge-demo --build models/build
	$(VENV)/bin/edge-agent demo --config models/build/agent.yaml

# Format, lint, types (mypy --strict with the pydantic plugin, on the four product
# packages) and layering (import-linter: the core below the products, the products
# independent of each other); then the tests.
test: $(STAMP) lint
	deploy/ensure-test-tools.sh
	$(PY) -m pytest -q
	# Both services run on uvloop by default: the in-process async tests run on it too.
	EDGEFLEET_TEST_LOOP=uvloop $(PY) -m pytest -q tests/agent/test_api.py \
		tests/agent/test_dataplane.py tests/agent/test_device_link.py \
		tests/agent/test_model_store.py tests/agent/test_batcher.py \
		tests/agent/test_cloud_faults.py tests/agent/test_fallback_modes.py \
		tests/core/test_mqtt_link.py tests/agent/test_mqtt_telemetry.py \
		tests/agent/test_mqtt_agent.py tests/agent/test_sync.py \
		tests/fleet/test_fleet_bus.py tests/e2e/test_fleet_e2e.py \
		tests/fleet/test_console_auth.py tests/fleet/test_timeseries.py \
		tests/fleet/test_fleet_metrics.py tests/fleet/test_console_events_http.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m bench overhead

clean:
	rm -rf $(VENV) models/build
