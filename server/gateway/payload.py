"""The gateway's JSON: a generate request's body checked for shape and types and turned into a GenerateRequest; the
service's answers (models, stream events, errors) as JSON; gRPC status codes as HTTP statuses.

Only what the proto cannot carry is refused here (a string where a number goes, a seed below 0, an unknown sampler
name); everything else, ranges included, is the server's to judge, so its INVALID_ARGUMENT stays the one truth."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from diffuserve.v1 import diffusion_pb2 as pb

from ..client import ClientRequest, float32_decimal
from ..noise import NOISE_MODES
from ..params import IMAGE_FORMATS, QUOTE_CHARS, noise_mode_name, scheduler_name

# The protobuf field types' ranges: a value outside them cannot even be put into the request.
INT32 = (-(2**31), 2**31 - 1)
UINT64 = (0, 2**64 - 1)
# float32's largest finite value.
FLOAT32_MAX = 3.4028234663852886e38
# Every sampler the API names (a model serves some of them: ListModels says which, the server checks).
SAMPLER_NAMES = tuple(scheduler_name(v) for v in pb.Scheduler.values() if v != pb.SCHEDULER_UNSPECIFIED)


@dataclass(frozen=True)
class Field:
    kind: str  # "string", "integer" or "number"
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()


# The body of POST /api/generate: the GenerateRequest's fields by their proto names, with one `seed`.
GENERATE_FIELDS: Mapping[str, Field] = {
    "prompt": Field("string"),
    "negative_prompt": Field("string"),
    "model": Field("string"),
    "steps": Field("integer", INT32),
    "guidance_scale": Field("number"),
    "scheduler": Field("string", choices=SAMPLER_NAMES),
    "width": Field("integer", INT32),
    "height": Field("integer", INT32),
    "seed": Field("integer", UINT64),
    "preview_interval": Field("integer", INT32),
    "noise_mode": Field("string", choices=NOISE_MODES),
    "output_format": Field("string", choices=IMAGE_FORMATS),
}

# Google's mapping of gRPC codes to HTTP statuses (google.rpc.Code); 499 is the "client closed request" of nginx.
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# The server's messages name a field first ("steps: must be in 1..150, got 500"), several joined by "; ".
FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*):")


class PayloadError(ValueError):
    """A body the gateway cannot forward; `field` names the part at fault ("body" for the whole)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


def parse_body(data: bytes) -> dict[str, Any]:
    """The body as a JSON object; PayloadError for anything else (bad bytes, NaN, nesting past the parser)."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(data, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as error:
        raise PayloadError("body", f"not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise PayloadError("body", f"expected a JSON object of the request's fields, got {json_type(body)}")
    return body


def json_type(value: Any) -> str:
    """A JSON value as an error shows it: its type, and a scalar's value (cut short)."""
    if value is None or isinstance(value, list | dict):
        return "null" if value is None else "an array" if isinstance(value, list) else "an object"
    kind = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, int | float) else "a string"
    return f"{kind} {json.dumps(value)[:QUOTE_CHARS]}"


def checked(name: str, value: Any) -> Any:
    """One field's value as the proto takes it, or PayloadError saying what is allowed."""
    field = GENERATE_FIELDS[name]
    if field.kind == "string":
        if not isinstance(value, str):
            raise PayloadError(name, f"expected a string, got {json_type(value)}")
        if field.choices and value and value not in field.choices:
            raise PayloadError(name, f"{value!r} is not one of {', '.join(field.choices)}")
        return value
    if field.kind == "integer":
        low, high = field.bounds
        if isinstance(value, bool) or not isinstance(value, int):
            raise PayloadError(name, f"expected an integer, got {json_type(value)}")
        if not low <= value <= high:
            raise PayloadError(name, f"must be an integer in {low}..{high}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(name, f"expected a number, got {json_type(value)}")
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise PayloadError(name, f"must be a finite 32-bit float, got {value}")
    return float(value)


def generate_request(body: Mapping[str, Any]) -> pb.GenerateRequest:
    """The GenerateRequest a JSON body asks for. A field left out, or null, is the server's default."""
    unknown = sorted(set(body) - set(GENERATE_FIELDS))
    if unknown:
        raise PayloadError(unknown[0], f"unknown field; the fields are {', '.join(GENERATE_FIELDS)}")
    values = {name: checked(name, value) for name, value in body.items() if value is not None}
    seed = values.pop("seed", None)
    preview_interval = values.pop("preview_interval", 0)
    # As `diffuserve generate` builds it, so the same settings give the same file (settings embedded) either way.
    seeds = () if seed is None else (seed,)
    request = ClientRequest(prompt=values.pop("prompt", ""), seeds=seeds, **values).to_proto()
    request.preview_interval = preview_interval
    return request


def image_json(image: pb.Image) -> dict[str, Any]:
    return {
        "index": image.index,
        "seed": image.seed,
        "width": image.width,
        "height": image.height,
        "mime_type": image.mime_type,
        "data": base64.b64encode(image.data).decode("ascii"),
    }


def model_json(model: pb.ModelInfo) -> dict[str, Any]:
    """What the page fills its controls from: names, sizes, samplers, defaults and limits."""
    return {
        "name": model.name,
        "family": model.family,
        "width": model.width,
        "height": model.height,
        "sizes": [{"width": s.width, "height": s.height} for s in model.sizes],
        "schedulers": [scheduler_name(s) for s in model.schedulers],
        "default_scheduler": scheduler_name(model.default_scheduler),
        "default_steps": model.default_steps,
        "default_guidance_scale": float32_decimal(model.default_guidance_scale),
        "max_steps": model.max_steps,
        "max_images": model.max_images,
        "max_prompt_tokens": model.max_prompt_tokens,
        "tasks": [pb.Task.Name(t).removeprefix("TASK_").lower() for t in model.tasks],
        "guidance_embedded": model.guidance_embedded,
        "backend": model.backend,
        "target": model.target,
        "precision": model.precision,
    }


def completed_json(
    request: pb.GenerateRequest, response: pb.GenerateResponse, images: list[pb.Image]
) -> dict[str, Any]:
    """The settings actually used (after the server's defaults), each image's seed and size, and the timings."""
    first = images[0] if images else pb.Image()
    return {
        "request_id": response.request_id,
        "model": response.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": response.steps,
        "guidance_scale": float32_decimal(response.guidance_scale),
        "scheduler": scheduler_name(response.scheduler),
        "noise_mode": noise_mode_name(response.noise_mode),
        "seeds": [image.seed for image in images],
        "width": first.width,
        "height": first.height,
        "timings": MessageToDict(response.timings, preserving_proto_field_name=True),
    }


def event_json(event: pb.GenerateEvent) -> tuple[str, dict[str, Any]]:
    """A stream event as (SSE event name, data); `completed` is built by completed_json, which needs the stream."""
    kind = event.WhichOneof("event")
    if kind == "queued":
        return kind, {"request_id": event.request_id, "position": event.queued.position, "depth": event.queued.depth}
    if kind == "progress":
        p = event.progress
        previews = [image_json(image) for image in p.previews]
        return kind, {"step": p.step, "total": p.total, "eta_ms": p.eta_ms, "previews": previews}
    if kind == "image":
        return kind, image_json(event.image)
    raise ValueError(f"event_json: unexpected event {kind!r}")


def error_fields(message: str) -> list[str]:
    """The fields a server's message names, in order."""
    fields = []
    for part in message.split("; "):
        match = FIELD_PREFIX.match(part)
        if match and match.group(1) not in fields:
            fields.append(match.group(1))
    return fields


def error_json(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    # A bad field's message, or an unknown model's ("model: no model named ...").
    named = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    fields = error_fields(message) if named else []
    return {"error": {"code": code.name, "status": http_status(code), "message": message, "fields": fields}}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def sse(name: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event; json.dumps writes no newlines, so one data line carries it."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
