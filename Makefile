# One command serves, one command tests; both install what they need first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines here carry this wheel on disk; an open range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/shardserve/v1/*.proto)
STUBS  := shardserve/v1/.stubs

.PHONY: install run test lint stubs native bytecode system-deps clean

install: $(STAMP) $(STUBS) native bytecode

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(STUBS)

stubs: $(STUBS)

native: $(STAMP)
	@if [ -f native/build.py ]; then $(PY) native/build.py; fi

# The project's own modules compiled once (as pip does for site-packages): with PYTHONDONTWRITEBYTECODE
# set, every controller and worker start would otherwise recompile ~150 files (~0.2-0.3 s each start).
bytecode: $(STUBS)
	@$(PY) -m compileall -q -j 0 controller worker native shardserve bench >/dev/null

run: install
	$(VENV)/bin/shardserve serve

test: install system-deps
	$(PY) -m pytest -q -ra tests

# Debian's prometheus binary for tests/integration/test_prometheus_dashboard.py (~10 s, root only).
# Never fails the build: without it that test skips and says why.
system-deps:
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "system-deps: installing prometheus with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
	      >/dev/null 2>&1 || echo "system-deps: apt-get could not install prometheus; its tests will skip"; \
	  else \
	    echo "system-deps: prometheus not on PATH and not root; its tests will skip"; \
	  fi; \
	fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

clean:
	rm -rf $(VENV) shardserve/v1/*_pb2*.py* $(STUBS) native/_build
	find controller worker native shardserve bench tests -name __pycache__ -prune -exec rm -rf {} +
