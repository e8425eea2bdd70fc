"""One request's fate never decides another's: cancelled, disconnected and expired unary calls free the worker at
the next step, batch-mates complete, bad bytes and oversized or unknown input answer a clear status, overload is
refused promptly. All on real servers over loopback."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image

from diffuserve.server import worker as worker_module
from diffuserve.server.images import EXIF_IMAGE_DESCRIPTION, JPEG_EXIF_MAX_BYTES, TRUNCATED_KEY, exif_block
from diffuserve.server.models import ServedModel
from diffuserve.server.params import (
    MAX_IMAGE_BYTES,
    MAX_MASK_BLUR,
    MAX_PROMPT_CHARS,
    MAX_REQUEST_ID_CHARS,
    max_request_bytes,
    validate,
)
from diffuserve.server.worker import (
    Event,
    InferenceWorker,
    Job,
    JobCancelled,
    Progress,
    RequestFailed,
    WorkerConfig,
)
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import LONG, busy, euler_request, serving, wait_idle

GENERATE = "/diffuserve.v1.DiffusionService/Generate"
GENERATE_STREAM = "/diffuserve.v1.DiffusionService/GenerateStream"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# A character UTF-8 stores in 4 bytes and JSON escapes as a 12-character surrogate pair: the costliest prompt.
WIDE_CHARACTER = "\U0001f600"
# Whitespace UTF-8 stores in 3 bytes and JSON escapes in 6 characters; the tokenizer skips it. A prompt of the most
# characters is valid only within the model's tokens: a few words padded with it.
WIDE_SPACE = "\u3000"


def longest_valid_prompt(words: int) -> str:
    """MAX_PROMPT_CHARS characters, `words` tokens: the widest prompt a model serving that many tokens takes."""
    gap = (MAX_PROMPT_CHARS - 3 * words) // words
    prompt = ("red" + WIDE_SPACE * gap) * words
    return prompt + WIDE_SPACE * (MAX_PROMPT_CHARS - len(prompt))


def padded_png(size: tuple[int, int], mode: str, total_bytes: int) -> bytes:
    """A valid PNG of exactly total_bytes: a small image and an ancillary chunk of padding, which decoders skip."""
    buffer = io.BytesIO()
    Image.new(mode, size, 255).save(buffer, format="PNG")
    data = buffer.getvalue()
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    padding = total_bytes - len(data) - 12  # a chunk's length, type and CRC take 12 bytes
    body = b"\0" * padding
    chunk = padding.to_bytes(4, "big") + b"pdDg" + body + zlib.crc32(b"pdDg" + body).to_bytes(4, "big")
    return data[:end] + chunk + data[end:]


def wait_busy(server, timeout: float = 30.0) -> None:
    until = time.monotonic() + timeout
    while server.running.worker.idle():
        assert time.monotonic() < until, "the worker never took the request"
        time.sleep(0.005)


def steps_when_idle(server) -> int:
    wait_idle(server)
    return server.running.worker.steps_run


# Steps a job may still run after its caller is gone: the one in flight, and the time it takes gRPC to tell us.
STEPS_TO_NOTICE = LONG // 4


def test_a_cancelled_unary_call_leaves_the_worker_within_a_step(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        call = stub.Generate.future(euler_request(prompt="a red circle", steps=LONG, seeds=[1, 2]))
        wait_busy(server)
        call.cancel()
        steps = steps_when_idle(server)
        after = stub.Generate(euler_request(prompt="a blue square", steps=2))
    assert call.cancelled()
    # Before the fix the worker ran all 150 steps for nobody, and the next request waited behind them.
    assert steps < STEPS_TO_NOTICE
    assert after.timings.batch_size == 1 and len(after.images) == 1


CLIENT_THAT_WILL_BE_KILLED = """
import sys, grpc
from diffuserve.v1 import diffusion_pb2 as pb, diffusion_pb2_grpc as pb_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = pb_grpc.DiffusionServiceStub(channel)
    request = pb.GenerateRequest(prompt="a red circle", steps=150, seeds=[1, 2], scheduler=pb.SCHEDULER_EULER)
    call = stub.Generate.future(request)
    print("sent", flush=True)
    call.result()
"""


def test_a_client_killed_mid_request_frees_the_worker(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT_THAT_WILL_BE_KILLED, server.address], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout.readline().strip() == "sent"
            wait_busy(server)
            client.send_signal(signal.SIGKILL)
            client.wait(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
        steps = steps_when_idle(server)
        assert stub.Generate(euler_request(prompt="a blue square", steps=2)).images
    assert steps < STEPS_TO_NOTICE


def test_a_batch_mate_cancelled_mid_run_does_not_fail_the_others(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        with busy(stub):
            doomed = stub.Generate.future(euler_request(prompt="a red circle", steps=LONG, seeds=[1]))
            mate = stub.Generate.future(euler_request(prompt="a green circle", steps=LONG, seeds=[2]))
        time.sleep(0.3)  # both are now denoising together
        doomed.cancel()
        response = mate.result(timeout=120)
    assert response.timings.batch_size == 2 and len(response.images) == 1


def test_a_batch_mate_past_its_deadline_does_not_fail_the_others(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (_, stub, _):
        with busy(stub):  # both queue behind it; the short deadline passes in the queue or while they share a batch
            short = stub.Generate.future(euler_request(prompt="a red circle", steps=LONG, seeds=[1]), timeout=0.5)
            mate = stub.Generate.future(euler_request(prompt="a green circle", steps=LONG, seeds=[2]))
        response = mate.result(timeout=120)
        with pytest.raises(grpc.RpcError) as error:
            short.result()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(response.images) == 1


def test_an_overload_burst_is_refused_promptly_and_every_accepted_request_ends_on_its_own_terms(
    tiny_model: ServedModel,
) -> None:
    capacity, burst = 4, 40

    def call(index: int) -> tuple[int, float | None, grpc.StatusCode, dict]:
        deadline = 0.4 if index % 2 else None
        request = euler_request(prompt="a red circle", steps=LONG, seeds=[index])
        try:
            stub.Generate(request, timeout=deadline)
            return index, deadline, grpc.StatusCode.OK, {}
        except grpc.RpcError as e:
            return index, deadline, e.code(), dict(e.trailing_metadata() or ())
        finally:
            ended[index] = time.monotonic()

    ended: dict[int, float] = {}
    with serving(tiny_model, queue_capacity=capacity) as (server, stub, _), ThreadPoolExecutor(burst) as pool:
        first = pool.submit(call, 0)  # no deadline: sure to be accepted and to complete
        wait_busy(server)
        rest = pool.map(call, range(1, burst))  # submitted at once; results read below
        outcomes = [first.result(timeout=120), *rest]
        wait_idle(server)
        assert stub.Generate(euler_request(prompt="a blue square", steps=2)).images
    refused = [o for o in outcomes if o[2] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    finished = [o for o in outcomes if o[2] in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)]
    assert len(refused) + len(finished) == burst, outcomes
    assert refused and len(finished) >= capacity
    assert all("grpc-retry-pushback-ms" in trailers for *_, trailers in refused)
    # Only a request that asked for a short deadline may miss it; every other accepted request completes.
    assert all(code == grpc.StatusCode.OK for _, deadline, code, _ in finished if deadline is None)
    # Refusals come at once, before the first accepted request has even finished denoising.
    first_completion = min(ended[i] for i, _, code, _ in finished if code == grpc.StatusCode.OK)
    assert max(ended[i] for i, *_ in refused) < first_completion


def test_jpeg_metadata_of_the_longest_prompt_is_truncated_to_fit_and_spares_the_batch(
    tiny_model: ServedModel,
) -> None:
    # One chunk each, so it shares the U-Net's calls with its mate.
    prompt, negative = longest_valid_prompt(60), longest_valid_prompt(50)
    wide = euler_request(
        prompt=prompt, negative_prompt=negative, steps=4, seeds=[1], output_format=pb.IMAGE_FORMAT_JPEG
    )
    wide.embed_metadata = True
    with serving(tiny_model) as (_, stub, _):
        with busy(stub):
            wide_call = stub.Generate.future(wide)
            mate = stub.Generate.future(euler_request(prompt="a green circle", steps=4, seeds=[2]))
        response, mate_response = wide_call.result(timeout=60), mate.result(timeout=60)
    assert response.timings.batch_size == mate_response.timings.batch_size == 2
    metadata = json.loads(Image.open(io.BytesIO(response.images[0].data)).getexif()[EXIF_IMAGE_DESCRIPTION])
    assert metadata[TRUNCATED_KEY] == "prompt,negative_prompt" and prompt.startswith(metadata["prompt"])
    assert negative.startswith(metadata["negative_prompt"])
    assert 0 < len(metadata["prompt"]) == len(metadata["negative_prompt"]) < MAX_PROMPT_CHARS


def test_exif_block_keeps_what_fits_and_cuts_the_prompts_to_the_longest_common_length() -> None:
    short = {"prompt": "a red circle", "negative_prompt": "", "seed": "1"}
    assert TRUNCATED_KEY not in exif_block(short, JPEG_EXIF_MAX_BYTES).decode("latin-1")
    both = {"prompt": WIDE_CHARACTER * 9000, "negative_prompt": "x" * 9000, "seed": "1"}
    block = exif_block(both, JPEG_EXIF_MAX_BYTES)
    assert len(block) <= JPEG_EXIF_MAX_BYTES
    exif = Image.Exif()
    exif.load(block)
    kept = json.loads(exif[EXIF_IMAGE_DESCRIPTION])
    assert kept[TRUNCATED_KEY] == "prompt,negative_prompt" and kept["seed"] == "1"
    assert len(kept["prompt"]) == len(kept["negative_prompt"]) > 0
    # The cut is tight: one more character of each (12 bytes as a JSON surrogate pair, and 1) would not fit.
    assert len(block) + 12 + 1 > JPEG_EXIF_MAX_BYTES


def test_an_unknown_model_name_is_quoted_short_and_answers_not_found(stub) -> None:
    name = "m" * 50_000
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model=name, prompt="a red circle"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details().startswith("model: no model named 'mmm") and len(error.value.details()) < 300
    assert "(50000 characters)" in error.value.details()


# A bad tag, a string longer than the bytes left, field number 0: not a message of any type.
UNDECODABLE = [b"\xff\xff\xff", b"\x1a\x05abc", bytes(range(256))]
# Field 3 (GenerateRequest's prompt) holding bytes that are not UTF-8; to Health's request it is an unknown field.
BAD_PROMPT = b"\x1a\x02\xff\xfe"


@pytest.mark.parametrize("payload", [*UNDECODABLE, BAD_PROMPT])
def test_undecodable_request_bytes_answer_invalid_argument_on_every_method(channel, stub, payload: bytes) -> None:
    stream = channel.unary_stream(GENERATE_STREAM)
    calls = {
        GENERATE: channel.unary_unary(GENERATE),
        GENERATE_STREAM: lambda data, timeout: list(stream(data, timeout=timeout)),
    }
    if payload != BAD_PROMPT:
        calls[HEALTH_CHECK] = channel.unary_unary(HEALTH_CHECK)
    for method, call in calls.items():
        with pytest.raises(grpc.RpcError) as error:
            call(payload, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert error.value.details().startswith(
            f"request: the bytes sent are not a valid request message for {method}"
        )
    assert stub.ListModels(pb.ListModelsRequest()).models


def test_the_receive_limit_admits_the_largest_valid_request_and_refuses_more(tiny_model: ServedModel) -> None:
    limits = tiny_model.defaults
    size = tiny_model.sizes[0]
    largest = euler_request(
        prompt=longest_valid_prompt(150),
        negative_prompt=longest_valid_prompt(150),
        request_id="r" * MAX_REQUEST_ID_CHARS,
        model=tiny_model.name,
        seeds=[2**64 - 1] * limits.max_images,
        steps=1,
        guidance_scale=7.5,
        quality=100,
        preview_interval=1,
        init_image=padded_png(size, "RGB", MAX_IMAGE_BYTES),
        mask_image=padded_png(size, "L", MAX_IMAGE_BYTES),
        mask_blur=MAX_MASK_BLUR,
    )
    assert 2 * MAX_IMAGE_BYTES < largest.ByteSize() <= max_request_bytes(limits.max_images)
    validate(largest, {tiny_model.name: tiny_model}, tiny_model.name)  # valid, so it must get through
    oversized = pb.GenerateRequest(prompt="x" * (max_request_bytes(limits.max_images) + 1))
    with serving(tiny_model) as (_, stub, _):
        assert len(stub.Generate(largest).images) == limits.max_images
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(oversized)
        assert stub.Generate(euler_request(prompt="a red circle", steps=1)).images
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def make_job(model: ServedModel, prompt: str, seed: int, steps: int = 6, **job) -> Job:
    request = euler_request(prompt=prompt, steps=steps, seeds=[seed])
    return Job(model, validate(request, {model.name: model}, model.name), **job)


def held_until(gate: threading.Event):
    """A listener that holds the worker at its first step until the gate opens, so others queue up meanwhile."""

    def listener(event: Event) -> None:
        if isinstance(event, Progress):
            gate.wait(30)

    return listener


def test_a_listener_that_fails_fails_its_own_request_alone(tiny_model: ServedModel) -> None:
    def broken(event: Event) -> None:
        if isinstance(event, Progress) and event.step == 3:
            raise RuntimeError("the client's loop is gone <object at 0xdead>")

    worker = InferenceWorker(WorkerConfig()).start()
    gate = threading.Event()
    try:
        worker.submit(make_job(tiny_model, "a yellow square", 0, steps=2, listener=held_until(gate)))
        failing = make_job(tiny_model, "a red circle", 1, listener=broken)
        mate = make_job(tiny_model, "a green circle", 2, listener=lambda event: None)
        worker.submit(failing)
        worker.submit(mate)
        gate.set()
        result = mate.future.result(timeout=60)
        with pytest.raises(RequestFailed) as error:
            failing.future.result(timeout=60)
    finally:
        worker.stop()
    assert mate.batch_size == 2 and len(result.images) == 1
    assert failing.steps_done == 3
    assert "0x" not in str(error.value) and "delivering an event failed" in str(error.value)


def test_a_job_whose_caller_gave_up_before_it_ran_never_runs(tiny_model: ServedModel) -> None:
    worker = InferenceWorker(WorkerConfig()).start()
    gate = threading.Event()
    try:
        worker.submit(make_job(tiny_model, "a red circle", 1, steps=2, listener=held_until(gate)))
        abandoned, cancelled, mate = (make_job(tiny_model, "a blue square", seed) for seed in (2, 3, 4))
        for job in (abandoned, cancelled, mate):
            worker.submit(job)
        abandoned.future.cancel()  # what a caller's future does when the caller stops waiting
        cancelled.cancel()
        gate.set()
        assert len(mate.future.result(timeout=60).images) == 1
        with pytest.raises(JobCancelled):
            cancelled.future.result(timeout=60)
    finally:
        worker.stop()
    assert abandoned.future.cancelled() and abandoned.steps_done == 0 and cancelled.steps_done == 0


def test_unary_calls_build_no_previews(tiny_model: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = worker_module.preview_images
    monkeypatch.setattr(worker_module, "preview_images", lambda *a: built.append(1) or real(*a))
    request = euler_request(prompt="a red circle", steps=4, preview_interval=1)
    with serving(tiny_model) as (_, stub, _):
        assert stub.Generate(request).images
        assert not built  # nobody would receive them
        events = list(stub.GenerateStream(request))
    assert len(built) == 4 and sum(len(e.progress.previews) for e in events) == 4
