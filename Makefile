# Needs python3; tools/setup-debian.sh adds missing Debian packages (python3-venv),
# everything else goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps: .venv is up to date with pyproject.toml, gen/ with proto/.
INSTALLED := $(VENV)/.installed
GENERATED := gen/.stamp
PROTOS := $(shell find proto -name '*.proto')

.PHONY: setup gen typecheck test demo bench clean

setup: $(INSTALLED) $(GENERATED)

# gen/tlbsim must exist before the editable install, or it does not map the
# tlbsim package to it (see pyproject.toml).
$(INSTALLED): pyproject.toml
	tools/setup-debian.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	mkdir -p gen/tlbsim
	$(BIN)/pip install -e '.[test]'
	touch $@

$(GENERATED): $(PROTOS) tools/gen_proto.py $(INSTALLED)
	$(BIN)/python tools/gen_proto.py
	touch $@

gen: $(INSTALLED)
	$(BIN)/python tools/gen_proto.py
	touch $(GENERATED)

# mypy (pinned in the test extras) on services/ and loadgen/ ([tool.mypy] in pyproject.toml).
typecheck: setup
	$(BIN)/python -m mypy

test: typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/tlbsim demo

bench: setup
	$(BIN)/tlbsim bench

clean:
	rm -rf $(VENV) gen build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './.git/*' -prune -exec rm -rf {} +
