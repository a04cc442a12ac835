# Everything runs from the project's own virtual environment, created by `make install`.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: install test-tools serve test test-fast clean

install:
	bash deploy/install.sh $(VENV)

# Without MODEL a tiny random-weight checkpoint is generated and served on CPU. ARGS: any
# other qwen-vl-serve flags, e.g. ARGS="--max-model-len 4096 --api-key k".
serve: install
	$(VENV)/bin/qwen-vl-serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL),) $(ARGS)

# nginx for the load-balancer tests (kept out of install.sh so images do not ship it).
test-tools:
	bash deploy/install-test-tools.sh

test: install test-tools
	VLLM_CPU_KVCACHE_SPACE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Only the tests that need no engine (seconds, not minutes).
test-fast: install
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
