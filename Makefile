PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

WEB := qat_sadam/export/runtimes/web

# The runtimes extra and the npm lock give every runtime of qat_sadam/export/runtimes; npm installs
# onnxruntime-web into a cache folder outside the source tree (`qat-sadam runtimes --install-web`:
# $QAT_SADAM_CACHE or ~/.cache/qat-sadam). Without node the ort-web runtime is reported "not run".
$(STAMP): pyproject.toml constraints.txt $(WEB)/package-lock.json Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,timm,logging,runtimes,peers]'
	if command -v npm >/dev/null; then $(BIN)/qat-sadam runtimes --install-web; \
	else echo "npm not found: the ort-web runtime will be reported not run"; fi
	touch $(STAMP)

# Lint and format check first (ruff, 120 columns: pyproject.toml), then the tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The user's path on built-in data: a float model, then its W4A4 fine-tune with the accuracy ladder,
# then the same model on every runtime installed (a runtime not installed is reported not run).
demo: $(STAMP)
	$(BIN)/qat-sadam train quickstart_float --out runs/quickstart_float --force --quiet
	$(BIN)/qat-sadam train quickstart_finetune --out runs/quickstart_finetune --force --quiet
	$(BIN)/qat-sadam export runs/quickstart_finetune --runtimes all -o runs/quickstart_finetune/export-runtimes

clean:
	rm -rf runs .pytest_cache
