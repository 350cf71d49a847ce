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
	$(VENV)/bin/edge-fleet demo --build models/build
	$(VENV)/bin/edge-agent demo --config models/build/agent.yaml

test: $(STAMP)
	deploy/ensure-test-tools.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	# The agent runs on uvloop by default: the in-process async tests run on it too.
	EDGEFLEET_TEST_LOOP=uvloop $(PY) -m pytest -q tests/test_api.py tests/test_model_store.py \
		tests/test_batcher.py tests/test_cloud_faults.py tests/test_fallback_modes.py \
		tests/test_mqtt_link.py tests/test_mqtt_telemetry.py tests/test_mqtt_agent.py \
		tests/test_sync.py tests/test_fleet_bus.py tests/test_fleet_e2e.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m bench overhead

clean:
	rm -rf $(VENV) models/build
