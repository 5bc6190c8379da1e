# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; override e.g. `make test TORCH_SPEC=torch` on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MUTATE_TARGETS := checkpoint-io run-owners registry logger loader cache
.PHONY: run test test-all lint docs mutate $(addprefix mutate-,$(MUTATE_TARGETS)) venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python experiments/run.py

# The default suite skips tests marked `slow`; `make test-all` runs everything.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# Mutation testing of the plugin's arithmetic (noise, policy, sampler, cadence, clock, per_example,
# measured) against their fast tests ([tool.mutmut] in pyproject.toml); not part of `make test`.
# Starts afresh each time (mutmut would otherwise keep old verdicts when only the tests changed).
# MUTATE_CHILDREN sets the parallel workers.
MUTATE_CHILDREN ?= 2
mutate: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_CHILDREN)
	$(BIN)/python benchmarks/mutation_score.py

# One module where data can be lost against the tests that guard it (benchmarks/mutate.py TARGETS):
# make mutate-checkpoint-io, mutate-run-owners, mutate-registry, mutate-logger, mutate-loader, mutate-cache.
$(addprefix mutate-,$(MUTATE_TARGETS)): mutate-%: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/mutate.py $* --max-children $(MUTATE_CHILDREN)

# ruff, then mypy: strict on the plugin (the base install), mypy's defaults on the rest of the package.
lint: $(STAMP)
	$(BIN)/ruff check --no-cache . && $(BIN)/ruff format --check --no-cache .
	$(BIN)/mypy --strict lightning_batch/plugin
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/) into site/, in strict mode: a broken link or reference fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache site
