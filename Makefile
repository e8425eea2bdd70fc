# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
# The oldest Python the runtime supports (JetPack 6 ships 3.10): the runtime check installs the wheel under it.
# pyenv's build where there is one (its shim answers only for the selected versions), else python3.10 on the PATH.
PYTHON_RUNTIME ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
VENV := .venv
BIN := $(VENV)/bin
# Everything installs against constraints.txt: pinned CPU torch, and grpcio/grpcio-tools/protobuf that match the stubs.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

WEIGHTS := models/shapes-sd
BUNDLED := server/bundled/shapes
RUNTIME_VENV := build/runtime-venv

.PHONY: install demo test lint protos bench evaluate model bundle gallery wheel runtime-check clean

$(BIN)/diffuserve: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[cpu,export,dev,ray,plots,gateway]"
	touch $@

install: $(BIN)/diffuserve

# The bundled model's engines are a build output: exported from the committed weights (about 30 s), parity gate
# included, whenever the weights change. The package (and a wheel built from it) carries them.
$(BUNDLED)/manifest.json: $(shell find $(WEIGHTS) -type f -not -name training.json) $(wildcard export/*.py) engine/manifest.py | $(BIN)/diffuserve
	$(BIN)/diffuserve export $(WEIGHTS) -o $(BUNDLED) --size 64x64 --batch 1 --batch 4 --name shapes \
		--default-steps 20 --default-guidance 3

bundle: $(BUNDLED)/manifest.json

# The main job: export the bundled model, serve it on a loopback port and draw one prompt to demo.png over gRPC.
demo: bundle
	$(BIN)/diffuserve demo -o demo.png

test: lint bundle
	$(BIN)/python -m pytest -q
	$(MAKE) runtime-check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The serving runtime alone, as an edge box installs it: the wheel with only its cpu extra under the oldest Python
# supported, no torch, serving the engines the wheel carries for one request.
wheel: bundle
	# setuptools packs whatever an earlier build left in build/lib, moved or deleted modules included.
	rm -rf dist build/lib build/bdist.*
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps -w dist .

runtime-check: wheel
	rm -rf $(RUNTIME_VENV)
	$(PYTHON_RUNTIME) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "$$(ls dist/diffuserve-*.whl)[cpu]"
	@if $(RUNTIME_VENV)/bin/python -c "import torch" 2>/dev/null; then echo "torch was installed with the runtime"; exit 1; fi
	cd $(RUNTIME_VENV) && bin/diffuserve demo -o demo.png
	@echo "runtime check: $$($(RUNTIME_VENV)/bin/python --version), no torch, the wheel's bundled model served"

# Regenerates the gRPC stubs beside the .proto (tests fail when they are stale).
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		protos/diffuserve/v1/diffusion.proto protos/inference/grpc_service.proto
	# KServe's stubs import themselves as `inference`; they install as diffuserve.inference.
	sed -i -e 's/^from inference import/from diffuserve.inference import/' \
		-e "s/'inference\.grpc_service_pb2'/'diffuserve.inference.grpc_service_pb2'/" \
		protos/inference/grpc_service_pb2.py protos/inference/grpc_service_pb2_grpc.py

# Latency per stage against diffusers' pipeline on the same weights.
bench: bundle
	$(BIN)/diffuserve bench $(BUNDLED) --reference $(WEIGHTS)

# Grades the bundled model's drawings of 100 random prompts per sampler, through the gRPC server.
evaluate: bundle
	$(BIN)/diffuserve evaluate --count 100

# The README's picture of the bundled model's drawings.
gallery: bundle
	$(BIN)/diffuserve gallery -o docs/gallery.png

# Retrains the bundled model from scratch (about 45 min on 2 CPU cores); the next bundle re-exports it.
model: install
	$(BIN)/python -m diffuserve.export.train_shapes -o $(WEIGHTS)
	$(MAKE) bundle gallery

clean:
	rm -rf $(VENV) build dist $(BUNDLED) demo.png
