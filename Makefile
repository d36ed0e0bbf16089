PYTHON ?= .venv/bin/python
PROTOS := $(wildcard protos/servefleet/api/*.proto)

.PHONY: protos check-protos test lint bench up down

# Generated stubs live in servefleet/api and are never edited by hand.
protos:
	rm -rf servefleet/api && mkdir -p servefleet/api
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	printf '"""Generated from protos/ by `make protos`; do not edit."""\n' > servefleet/api/__init__.py

# Fails when the committed stubs differ from what protos/ generates now.
check-protos:
	rm -rf build/protos-check && mkdir -p build/protos-check
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=build/protos-check --pyi_out=build/protos-check \
		--grpc_python_out=build/protos-check $(PROTOS)
	diff -r -x __init__.py -x __pycache__ build/protos-check/servefleet/api servefleet/api \
		|| (echo "generated stubs are stale: run make protos" && exit 1)

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

bench:
	for b in bench/*.py; do $(PYTHON) $$b --quick || exit 1; done

up:
	.venv/bin/servefleet up

down:
	.venv/bin/servefleet down
