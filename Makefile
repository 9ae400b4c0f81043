# The two commands of README.md: `make run` (the main job) and `make test` (the suite).
# Each installs what it needs into .venv first (idempotent; only the package registry is needed).
FLAVOUR ?= cpu
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-fast
setup:
	@bash scripts/setup.sh $(FLAVOUR)

run: setup
	$(PY) -m jobs.main $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Skip the slow end-to-end tests while developing (CI runs everything).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
