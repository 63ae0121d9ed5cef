# Two entry points on a fresh machine; both create .venv on first use.
#   make run    the main job on the embedded default (local Prefect API, local storage)
#   make test   the test suite (what CI runs)
#   make serve  a local Prefect server on 127.0.0.1:$(PORT) with the shipped deployments and a worker
#               (python -m deployments.local up; state in runs/prefect-server); make serve-down stops it
VENV := .venv
STAMP := $(VENV)/.lorasuite-installed

PORT ?= 4200

.PHONY: run test setup clean serve serve-down
$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lorasuite demo --workdir runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/python -m deployments.local up --port $(PORT) $(SERVE_ARGS)

serve-down:
	$(VENV)/bin/python -m deployments.local down

clean:
	rm -rf runs .pytest_cache
