#!/usr/bin/env bash
# The containers' entrypoint: checks the model folder, then replaces itself with `diffuserve serve` (exec), so that
# `docker stop`'s SIGTERM reaches the server, which drains accepted requests for up to --grace seconds and exits.
#
# Environment (every one optional):
#   MODEL_DIR     a folder made by `diffuserve export SRC -o OUT --target tensorrt` (default /models/model)
#   PORT          the gRPC port, also read by the health probe (default 50051)
#   BACKEND       auto | cpu | cuda | tensorrt (default tensorrt)
#   LOW_MEMORY    1/true/yes/on: keep only the current stage's engines resident (--low-memory, for 8 GB Jetsons)
#   WORKSPACE_GB  the TensorRT builder's workspace limit for the first start's build (build-engines --workspace-gb)
#   DEVICE_ID     the GPU to build for and serve on (default: diffuserve's own, 0)
#   EXTRA_ARGS    more `diffuserve serve` options, split on whitespace, e.g. "--grace 60 --max-images 4"
# Arguments given after the image name (`docker run ... IMAGE --grace 60`) are appended to `serve` too.
set -euo pipefail

MODEL_DIR="${MODEL_DIR:-/models/model}"
PORT="${PORT:-50051}"
BACKEND="${BACKEND:-tensorrt}"
LOW_MEMORY="${LOW_MEMORY:-0}"
WORKSPACE_GB="${WORKSPACE_GB:-}"
DEVICE_ID="${DEVICE_ID:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

# Exit status 2 for a container that is set up wrongly (as argparse uses for bad arguments): restarting cannot help.
die() {
    echo "diffuserve entrypoint: $*" >&2
    exit 2
}

if [[ ! -f "$MODEL_DIR/manifest.json" ]]; then
    die "no manifest.json in $MODEL_DIR: mount a folder made by 'diffuserve export SRC -o OUT --target tensorrt'" \
        "there (docker run -v /srv/models/sd15:/models/model ...), or set MODEL_DIR to one"
fi

case "${LOW_MEMORY,,}" in
    1 | true | yes | on) low_memory=(--low-memory) ;;
    0 | false | no | off | "") low_memory=() ;;
    *) die "LOW_MEMORY is one of 1, true, yes, on or 0, false, no, off; got '$LOW_MEMORY'" ;;
esac

device=()
if [[ -n "$DEVICE_ID" ]]; then
    device=(--device-id "$DEVICE_ID")
fi

read -r -a extra <<<"$EXTRA_ARGS"

# TensorRT plans are built for the GPU and TensorRT version that run them, into the model folder, so the volume keeps
# them across restarts. `serve --build-missing` builds only the plans this machine lacks and loads the rest: the first
# start on a new GPU takes minutes (the U-Net's build), later starts load the plans in seconds. Deciding here whether
# plans are missing would repeat the server's own check (GPU, TensorRT version, precision, shapes), so it is left to
# the server. WORKSPACE_GB is a setting of `build-engines` alone: when it is given and the folder holds no plans at all
# (a first start), that build runs through `build-engines` with it, and `serve` then finds the plans there.
build=()
if [[ "$BACKEND" == tensorrt || "$BACKEND" == auto ]]; then
    build=(--build-missing)
    if [[ ! -w "$MODEL_DIR" ]]; then
        echo "diffuserve entrypoint: $MODEL_DIR is not writable by uid $(id -u): plans this GPU lacks cannot be" \
            "built there (chown the volume to that uid, or run with --user)" >&2
    fi
    if [[ -n "$WORKSPACE_GB" ]] && ! compgen -G "$MODEL_DIR/tensorrt/plans/*" >/dev/null; then
        diffuserve build-engines "$MODEL_DIR" --workspace-gb "$WORKSPACE_GB" "${device[@]}"
    fi
fi

exec diffuserve serve "$MODEL_DIR" --backend "$BACKEND" --port "$PORT" \
    "${build[@]}" "${low_memory[@]}" "${device[@]}" "${extra[@]}" "$@"
