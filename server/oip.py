"""The KServe v2 / Open Inference Protocol service (`inference.GRPCInferenceService`), for tritonclient users: an
adapter over the same worker as DiffusionService, never a second pipeline. (perf_analyzer also asks for Triton's
ModelConfig extension, which is not served.)

ModelInfer's inputs become a diffuserve.v1 GenerateRequest, checked by the one validate(), queued as a Job on the
shared worker (same queue, batching, cancellation and deadlines) and answered with the raw pixels, UINT8 [N, H, W, 3]
as Triton's Stable Diffusion example returns them, and the seeds used, INT64 [N]. Errors take the status codes of
DiffusionService, each naming the input at fault.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from diffuserve.inference import grpc_service_pb2 as oip
from diffuserve.inference import grpc_service_pb2_grpc as oip_grpc
from diffuserve.v1 import diffusion_pb2 as pb

from .models import ServedModel
from .noise import NOISE_MODES
from .params import InvalidArgument, noise_mode_enum, quote, scheduler_enum, validate
from .pipeline import GenerateResult, to_uint8
from .service import DiffusionService, call_deadline, cancel_if_abandoned, metadata_request_id, package_version
from .worker import SHUTTING_DOWN, Job

log = logging.getLogger(__name__)

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "diffuserve"
# Each model is served in one version; the protocol names versions by strings.
MODEL_VERSION = "1"
PLATFORM = "diffuserve"
# None of the protocol's optional extensions (model repository, statistics, shared memory, sequences, ...) is served.
EXTENSIONS: tuple[str, ...] = ()
IMAGE_OUTPUT = "image"
SEED_OUTPUT = "seed"
# Triton's request parameter: microseconds the request may take, queue included (tritonclient's `timeout`).
TIMEOUT_PARAMETER = "timeout"
SEQUENCE_PARAMETER = "sequence_id"
# Seeds come back as INT64: a seed must fit one (the server draws its own below 2**63 too).
MAX_SEED = 2**63 - 1
INT32_RANGE = (-(2**31), 2**31 - 1)
# A BYTES element's length prefix on the wire: uint32, little-endian.
BYTES_PREFIX = struct.Struct("<I")

INTEGER_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16")
# Raw layouts: little-endian, as the protocol fixes them.
NUMPY_DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The InferTensorContents field of each datatype (FP16 has none: it travels raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Fields of GenerateRequest whose errors (from validate) name an input of another name here.
RENAMED_FIELDS = {"seeds": "seed", "request_id": "id"}
_FIELD_AT_START = re.compile(r"(^|; )(" + "|".join(RENAMED_FIELDS) + r"):")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # What ModelMetadata declares; a request may send any of `accepts`, which the declared type's values fit.
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[str, ...]
    # One element (any shape holding one, e.g. [1] or [1, 1]), or a list of them (seeds: one per image).
    scalar: bool = True


def _bytes_input(name: str) -> TensorSpec:
    return TensorSpec(name, "BYTES", (1,), ("BYTES",))


def _int_input(name: str, datatype: str = "INT32", scalar: bool = True) -> TensorSpec:
    return TensorSpec(name, datatype, (1,) if scalar else (-1,), INTEGER_TYPES, scalar)


INPUTS: Mapping[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        _bytes_input("prompt"),
        _bytes_input("negative_prompt"),
        _int_input("seed", "INT64", scalar=False),
        _int_input("steps"),
        TensorSpec("guidance_scale", "FP32", (1,), FLOAT_TYPES),
        _int_input("width"),
        _int_input("height"),
        _bytes_input("scheduler"),
        _int_input("num_images"),
        _bytes_input("noise_mode"),
    )
}
REQUIRED_INPUTS = ("prompt",)


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """Over the port's DiffusionService: its models, worker, draining flag, queueing, metrics, log line and status
    mapping are this service's too, so a request counts and ends the same whichever protocol it came by."""

    def __init__(self, service: DiffusionService):
        self.service = service
        self.models = service.models
        self.default_model = service.default_model
        self.worker = service.worker

    def ready(self) -> bool:
        return self.worker.alive and not self.service.draining

    async def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return oip.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext):
        # An unknown model or version is not ready: the protocol answers this call with a boolean, as Triton does.
        known = (request.name or self.default_model) in self.models and request.version in ("", MODEL_VERSION)
        return oip.ModelReadyResponse(ready=known and self.ready())

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=package_version("diffuserve"), extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        problem = model_problem(self.models, self.default_model, request.name, request.version)
        if problem:
            await context.abort(grpc.StatusCode.NOT_FOUND, problem)
        return model_metadata(self.models[request.name or self.default_model])

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        service = self.service
        name = request.model_name or self.default_model
        if service.draining:
            await service.refuse(context, name, "rejected", grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        problem = model_problem(self.models, self.default_model, request.model_name, request.model_version)
        if problem:
            await service.refuse(context, name, "invalid", grpc.StatusCode.NOT_FOUND, problem)
        model = self.models[name]
        try:
            wanted = requested_outputs(request)
            generate = generate_request(model, request)
            if not generate.request_id:  # a request id given as metadata, as proxies and tracing set it
                generate.request_id = metadata_request_id(context)
            params = validate(generate, self.models, self.default_model)
        except InvalidArgument as e:
            await service.refuse(context, name, "invalid", grpc.StatusCode.INVALID_ARGUMENT, oip_names(str(e)))
        job = await service.queue(params, context, deadline(request, context))
        with cancel_if_abandoned(job):
            result = await service.finish(job, context)
        return infer_response(job, result, wanted)


def add_oip_service(server: grpc.aio.Server, service: DiffusionService) -> InferenceService:
    """Registers inference.GRPCInferenceService on the server, over the port's DiffusionService: both drain together
    (ServerReady false, ModelInfer UNAVAILABLE) and share its worker and metrics."""
    servicer = InferenceService(service)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer


def model_problem(models: Mapping[str, ServedModel], default_model: str, name: str, version: str) -> str:
    """Why the named model (empty: the server's default, as in DiffusionService) cannot be found, or ''."""
    model = models.get(name or default_model)
    if model is None:
        return f"model_name: no model named {quote(name)}; this server has {sorted(models)}"
    if version not in ("", MODEL_VERSION):
        return f"model_version: model {model.name!r} has version {MODEL_VERSION!r} only, got {quote(version)}"
    return ""


def model_metadata(model: ServedModel) -> oip.ModelMetadataResponse:
    widths = {w for w, _ in model.sizes}
    heights = {h for _, h in model.sizes}
    # Fixed where the model serves one size (static shapes); -1 where it serves several.
    height = next(iter(heights)) if len(heights) == 1 else -1
    width = next(iter(widths)) if len(widths) == 1 else -1
    Tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=model.name,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[Tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in INPUTS.values()],
        outputs=[
            Tensor(name=IMAGE_OUTPUT, datatype="UINT8", shape=(-1, height, width, 3)),
            Tensor(name=SEED_OUTPUT, datatype="INT64", shape=(-1,)),
        ],
    )


def oip_names(message: str) -> str:
    """validate()'s message with GenerateRequest's field names replaced by the inputs' names here."""
    return _FIELD_AT_START.sub(lambda m: m[1] + RENAMED_FIELDS[m[2]] + ":", message)


def deadline(request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """The earlier of the call's deadline and Triton's `timeout` parameter (microseconds), as time.monotonic()."""
    limits = [limit for limit in (call_deadline(context),) if limit is not None]
    microseconds = parameter(request, TIMEOUT_PARAMETER)
    if isinstance(microseconds, int) and not isinstance(microseconds, bool) and microseconds > 0:
        limits.append(time.monotonic() + microseconds / 1e6)
    return min(limits) if limits else None


def parameter(request: oip.ModelInferRequest, key: str) -> bool | int | float | str | None:
    """A request parameter's value, whichever of InferParameter's kinds it has; None when absent or unset."""
    if key not in request.parameters:
        return None
    value = request.parameters[key]
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def requested_outputs(request: oip.ModelInferRequest) -> tuple[str, ...]:
    """The outputs the response carries, in the model's order: those asked for, or all when none are."""
    known = (IMAGE_OUTPUT, SEED_OUTPUT)
    asked = {output.name for output in request.outputs}
    unknown = sorted(asked - set(known))
    if unknown:
        raise InvalidArgument(f"outputs: the model has no output {', '.join(map(repr, unknown))}; it has {known}")
    return tuple(name for name in known if not asked or name in asked)


def generate_request(model: ServedModel, request: oip.ModelInferRequest) -> pb.GenerateRequest:
    """The GenerateRequest the inputs ask for; every bad input is named in one InvalidArgument."""
    errors: list[str] = []
    if parameter(request, SEQUENCE_PARAMETER) not in (None, 0, ""):
        errors.append(f"{SEQUENCE_PARAMETER}: model {model.name!r} is not a sequence model; each request stands alone")
    values = input_values(request, errors)
    for name in REQUIRED_INPUTS:
        if name not in values and not any(e.startswith(f"{name}:") for e in errors):
            spec = INPUTS[name]
            errors.append(f"{name}: required ({spec.datatype}, shape {list(spec.shape)})")

    fields: dict = {"model": model.name, "request_id": request.id}
    for name in ("prompt", "negative_prompt", "scheduler", "noise_mode"):
        if name in values:
            try:
                fields[name] = values[name][0].decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})")
                fields.pop(name, None)
    for name in ("steps", "width", "height", "num_images"):
        if name in values:
            value = values[name][0]
            low, high = INT32_RANGE
            if low <= value <= high:
                fields[name] = value
            else:
                errors.append(f"{name}: must fit an INT32, got {value}")
    if "guidance_scale" in values:
        fields["guidance_scale"] = values["guidance_scale"][0]
    if "seed" in values:
        seeds = values["seed"]
        bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if bad:
            errors.append(f"seed: each must be in 0..{MAX_SEED}, got {bad[0]}")
        else:
            fields["seeds"] = seeds
    if "scheduler" in fields:
        name = fields.pop("scheduler")
        if name in model.schedulers:
            fields["scheduler"] = scheduler_enum(name)
        else:
            errors.append(f"scheduler: {quote(name)} is not one of {', '.join(model.schedulers)}")
    if "noise_mode" in fields:
        name = fields.pop("noise_mode")
        if name in NOISE_MODES:
            fields["noise_mode"] = noise_mode_enum(name)
        else:
            errors.append(f"noise_mode: {quote(name)} is not one of {', '.join(NOISE_MODES)}")
    if errors:
        raise InvalidArgument("; ".join(errors))
    return pb.GenerateRequest(**fields)


def input_values(request: oip.ModelInferRequest, errors: list[str]) -> dict[str, list]:
    """Each known input's elements (bytes, int or float), from its typed contents or its raw bytes."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        errors.append(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in the "
            "order of inputs, or none"
        )
        return {}
    values: dict[str, list] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = INPUTS.get(name)
        if spec is None:
            errors.append(f"{quote(name)}: the model has no such input; it takes {', '.join(INPUTS)}")
            continue
        if name in values:
            errors.append(f"{name}: given twice")
            continue
        try:
            elements = tensor_elements(tensor, spec, raw[index] if raw else None)
        except InvalidArgument as e:
            errors.append(str(e))
            continue
        values[name] = elements
    return values


def tensor_elements(tensor: oip.ModelInferRequest.InferInputTensor, spec: TensorSpec, raw: bytes | None) -> list:
    name, datatype = spec.name, tensor.datatype
    if datatype not in spec.accepts:
        raise InvalidArgument(f"{name}: datatype must be {' or '.join(spec.accepts)}, got {quote(datatype)}")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    if spec.scalar and count != 1:
        raise InvalidArgument(f"{name}: takes one element (shape [1] or [1, 1]), got shape {shape}")
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(f"{name}: has both contents and raw_input_contents; send one of them")
        if datatype == "BYTES":
            return bytes_elements(name, raw, count)
        dtype = NUMPY_DTYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{name}: shape {shape} of {datatype} takes {count * dtype.itemsize} raw bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).tolist()
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"{name}: {datatype} travels in raw_input_contents only")
    elements = list(getattr(tensor.contents, field))
    if len(elements) != count:
        raise InvalidArgument(
            f"{name}: shape {shape} holds {count} element(s), got {len(elements)} in contents.{field}"
        )
    return elements


def bytes_elements(name: str, raw: bytes, count: int) -> list[bytes]:
    """BYTES in raw form: each element a uint32 little-endian length, then that many bytes."""
    elements = []
    offset = 0
    while offset < len(raw) and len(elements) <= count:
        if offset + BYTES_PREFIX.size > len(raw):
            break
        (length,) = BYTES_PREFIX.unpack_from(raw, offset)
        offset += BYTES_PREFIX.size
        if offset + length > len(raw):
            raise InvalidArgument(f"{name}: element {len(elements)} says {length} bytes, {len(raw) - offset} remain")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(elements) != count or offset != len(raw):
        raise InvalidArgument(
            f"{name}: shape holds {count} element(s); the raw BYTES (each a 4-byte little-endian length, then the "
            f"bytes) do not parse into {count}"
        )
    return elements


def infer_response(job: Job, result: GenerateResult, wanted: Sequence[str]) -> oip.ModelInferResponse:
    params, times = job.params, result.times
    Output = oip.ModelInferResponse.InferOutputTensor
    outputs, contents = [], []
    for name in wanted:
        if name == IMAGE_OUTPUT:
            # The same quantisation as the encoded images: these pixels are those of Generate's PNG.
            pixels = np.ascontiguousarray(to_uint8(result.pixels))
            outputs.append(Output(name=name, datatype="UINT8", shape=pixels.shape))
            contents.append(pixels.tobytes())
        else:
            outputs.append(Output(name=name, datatype="INT64", shape=(len(params.seeds),)))
            contents.append(np.asarray(params.seeds, dtype=NUMPY_DTYPES["INT64"]).tobytes())
    parameters = {
        "steps": oip.InferParameter(int64_param=params.steps),
        "guidance_scale": oip.InferParameter(double_param=params.guidance_scale),
        "scheduler": oip.InferParameter(string_param=params.scheduler),
        "noise_mode": oip.InferParameter(string_param=params.noise_mode),
        "batch_size": oip.InferParameter(int64_param=job.batch_size),
        "queue_ms": oip.InferParameter(double_param=times.queue_ms),
        "total_ms": oip.InferParameter(double_param=times.total_ms),
    }
    return oip.ModelInferResponse(
        model_name=params.model,
        model_version=MODEL_VERSION,
        id=params.request_id,
        parameters=parameters,
        outputs=outputs,
        raw_output_contents=contents,
    )
