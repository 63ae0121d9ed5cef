# Two entry points on a fresh machine; both create .venv on first use.
#   make run    the main job on the embedded default (local Prefect API, local storage)
#   make test   the test suite (what CI runs)
VENV := .venv
STAMP := $(VENV)/.lorasuite-installed

.PHONY: run test setup clean
$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lorasuite demo --workdir runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
