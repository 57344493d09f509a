# imagegw developer targets. `make run` and `make test` are the two the README promises;
# both set up the virtualenv and build what they need first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/imagegw/v1/*.proto)
# Envoy only transcodes the public services; admin.proto stays out of its descriptor.
PUBLIC_PROTOS := proto/imagegw/v1/images.proto proto/imagegw/v1/models.proto
DESCRIPTOR := build/imagegw.pb
# The Google protos we import, vendored from the pinned googleapis-common-protos wheel
# (make vendor-protos) so that protoc and buf resolve them alike, without a network.
VENDORED_PROTOS := google/api/annotations.proto google/api/http.proto google/api/httpbody.proto \
	google/api/field_behavior.proto
PROTOC = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I proto -I third_party/proto
SITE_PACKAGES = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# buf comes from npm (@bufbuild/buf, pinned in tools/package-lock.json), installed under tools/.
BUF := tools/node_modules/.bin/buf
# The official openai npm package, pinned by tests/js/package-lock.json (JavaScript SDK tests).
JS_DEPS := tests/js/node_modules/.package-lock.json

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## Create .venv and install imagegw with its dev dependencies

vendor-protos: $(STAMP) ## Copy the Google protos proto/ imports from the installed googleapis-common-protos wheel
	rm -rf third_party/proto && mkdir -p third_party/proto
	cd $(SITE_PACKAGES) && cp --parents $(VENDORED_PROTOS) $(CURDIR)/third_party/proto/

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

tools: $(BUF) ## Install the npm tools (buf) under tools/node_modules

gen: $(STAMP) ## Regenerate gen/ (Python, gRPC and type stubs) from proto/
	rm -rf gen && mkdir -p gen
	$(PROTOC) --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch gen/imagegw/__init__.py gen/imagegw/v1/__init__.py

check-gen: $(STAMP) ## Fail when gen/ does not match proto/, or third_party/proto the wheel
	@cd $(SITE_PACKAGES) && for f in $(VENDORED_PROTOS); do \
	  cmp -s $$f $(CURDIR)/third_party/proto/$$f || { echo "third_party/proto/$$f differs from the wheel: make vendor-protos"; exit 1; }; \
	done
	@tmp=$$(mktemp -d) && \
	$(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) && \
	touch $$tmp/imagegw/__init__.py $$tmp/imagegw/v1/__init__.py && \
	diff -r -x __pycache__ $$tmp gen && rm -rf $$tmp && echo "gen/ is fresh"

$(DESCRIPTOR): $(PROTOS) $(STAMP)
	mkdir -p build
	$(PROTOC) --include_imports --include_source_info --descriptor_set_out=$@ $(PUBLIC_PROTOS)

descriptor: $(DESCRIPTOR) ## Build Envoy's descriptor set (build/imagegw.pb)

$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund
	touch $@

js-deps: $(JS_DEPS) ## Install the pinned openai npm package for the JavaScript SDK tests

lint: $(STAMP) $(BUF) ## buf lint and breaking on proto/, ruff and mypy on server/
	$(BUF) lint
	@$(MAKE) --no-print-directory breaking
	$(VENV)/bin/ruff check server
	$(VENV)/bin/mypy server

# buf breaking against the newest release tag (v*): proto/ as it was there, taken with
# git archive (no network, and it works in a worktree too). Skipped until a tag exists.
breaking: $(BUF) ## buf breaking (WIRE_JSON) against the last release tag; skipped while there is none
	@tag=$$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null) || { \
	  echo "buf breaking: skipped, no release tag (v*) yet"; exit 0; }; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	git archive "$$tag" | tar -x -C "$$tmp" && \
	echo "buf breaking against $$tag" && \
	$(BUF) breaking --against "$$tmp"

run: $(STAMP) $(DESCRIPTOR) ## Start the gRPC server and Envoy on embedded defaults (Ctrl-C stops both)
	$(VENV)/bin/imagegw dev

test: $(STAMP) $(DESCRIPTOR) $(JS_DEPS) ## Run every test (unit, service, e2e with Envoy, contract with the Python and JavaScript openai SDKs, PostgreSQL)
	$(PY) -m pytest -q

deploy-config: $(STAMP) ## Render deploy/k8s/config/envoy.yaml (deploy/envoy-render.env) and copy the catalog there
	env -i PATH="$$PATH" $$(grep -v '^#' deploy/envoy-render.env | xargs) $(VENV)/bin/imagegw envoy-config > deploy/k8s/config/envoy.yaml
	cp server/catalog.toml deploy/k8s/config/catalog.toml

bench: $(STAMP) $(DESCRIPTOR) ## Run the load benchmarks and print a markdown table
	$(PY) -m bench

clean: ## Remove build outputs and local state (var/)
	rm -rf build var .pytest_cache tests/js/node_modules

.PHONY: help install vendor-protos tools gen check-gen descriptor js-deps lint breaking run test deploy-config bench clean
