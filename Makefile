# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything installs against constraints.txt: pinned CPU torch, and grpcio/grpcio-tools/protobuf that match the stubs.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint protos bench clean

$(BIN)/diffuserve: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[cpu,export,dev]"
	touch $@

install: $(BIN)/diffuserve

# The main job: build the default model, export it, serve it on a loopback port, draw one prompt to demo.png.
demo: install
	$(BIN)/diffuserve demo -o demo.png

test: lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerates the gRPC stubs beside the .proto (tests fail when they are stale).
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		protos/diffuserve/v1/diffusion.proto

bench: demo
	$(BIN)/diffuserve bench build/demo/tiny-sd-onnx --reference build/demo/tiny-sd

clean:
	rm -rf $(VENV) build demo.png
