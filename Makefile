# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything installs against constraints.txt: pinned CPU torch, and grpcio/grpcio-tools/protobuf that match the stubs.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

BUNDLED := server/bundled/shapes

.PHONY: install demo test lint protos bench evaluate model bundle clean

$(BIN)/diffuserve: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[cpu,export,dev]"
	touch $@

install: $(BIN)/diffuserve

# The main job: serve the bundled model on a loopback port and draw one prompt to demo.png over gRPC.
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

# Latency per stage against diffusers' pipeline on the same weights.
bench: install
	$(BIN)/diffuserve bench $(BUNDLED) --reference models/shapes-sd

# Grades the bundled model's drawings of 100 random prompts per sampler, through the gRPC server.
evaluate: install
	$(BIN)/diffuserve evaluate --count 100

# Retrains the bundled model from scratch (about 35 min on 2 CPU cores) and re-exports it into the package.
model: install
	$(BIN)/python -m diffuserve.export.train_shapes -o models/shapes-sd
	$(MAKE) bundle

# Re-exports the committed weights into the package (a test checks the shipped files agree with them).
bundle: install
	$(BIN)/diffuserve export models/shapes-sd -o $(BUNDLED) --height 64 --width 64 --batch 1 --batch 4 --name shapes \
		--default-steps 20 --default-guidance 3
	$(BIN)/diffuserve gallery -o docs/gallery.png

clean:
	rm -rf $(VENV) build demo.png
