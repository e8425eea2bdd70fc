from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_EULER: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_PNDM: _ClassVar[Scheduler]
    SCHEDULER_EULER_ANCESTRAL: _ClassVar[Scheduler]
    SCHEDULER_HEUN: _ClassVar[Scheduler]
    SCHEDULER_LMS: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M_KARRAS: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M_SDE_KARRAS: _ClassVar[Scheduler]
    SCHEDULER_UNIPC: _ClassVar[Scheduler]
    SCHEDULER_LCM: _ClassVar[Scheduler]

class NoiseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOISE_MODE_UNSPECIFIED: _ClassVar[NoiseMode]
    NOISE_MODE_TORCH_CPU: _ClassVar[NoiseMode]
    NOISE_MODE_NUMPY: _ClassVar[NoiseMode]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_TXT2IMG: _ClassVar[Task]
    TASK_IMG2IMG: _ClassVar[Task]
    TASK_INPAINT: _ClassVar[Task]

class ResizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIZE_MODE_UNSPECIFIED: _ClassVar[ResizeMode]
    RESIZE_MODE_RESIZE: _ClassVar[ResizeMode]
    RESIZE_MODE_REFUSE: _ClassVar[ResizeMode]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_EULER: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_PNDM: Scheduler
SCHEDULER_EULER_ANCESTRAL: Scheduler
SCHEDULER_HEUN: Scheduler
SCHEDULER_LMS: Scheduler
SCHEDULER_DPMPP_2M: Scheduler
SCHEDULER_DPMPP_2M_KARRAS: Scheduler
SCHEDULER_DPMPP_2M_SDE_KARRAS: Scheduler
SCHEDULER_UNIPC: Scheduler
SCHEDULER_LCM: Scheduler
NOISE_MODE_UNSPECIFIED: NoiseMode
NOISE_MODE_TORCH_CPU: NoiseMode
NOISE_MODE_NUMPY: NoiseMode
TASK_UNSPECIFIED: Task
TASK_TXT2IMG: Task
TASK_IMG2IMG: Task
TASK_INPAINT: Task
RESIZE_MODE_UNSPECIFIED: ResizeMode
RESIZE_MODE_RESIZE: ResizeMode
RESIZE_MODE_REFUSE: ResizeMode
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat

class GenerateRequest(_message.Message):
    __slots__ = ("model", "request_id", "prompt", "negative_prompt", "width", "height", "num_images", "steps", "guidance_scale", "scheduler", "seeds", "output_format", "quality", "embed_metadata", "preview_interval", "noise_mode", "init_image", "mask_image", "strength", "resize_mode", "mask_blur", "original_size", "crop_top", "crop_left", "target_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    EMBED_METADATA_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODE_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_images: int
    steps: int
    guidance_scale: float
    scheduler: Scheduler
    seeds: _containers.RepeatedScalarFieldContainer[int]
    output_format: ImageFormat
    quality: int
    embed_metadata: bool
    preview_interval: int
    noise_mode: NoiseMode
    init_image: bytes
    mask_image: bytes
    strength: float
    resize_mode: ResizeMode
    mask_blur: int
    original_size: ImageSize
    crop_top: int
    crop_left: int
    target_size: ImageSize
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_images: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., seeds: _Optional[_Iterable[int]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., embed_metadata: _Optional[bool] = ..., preview_interval: _Optional[int] = ..., noise_mode: _Optional[_Union[NoiseMode, str]] = ..., init_image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., resize_mode: _Optional[_Union[ResizeMode, str]] = ..., mask_blur: _Optional[int] = ..., original_size: _Optional[_Union[ImageSize, _Mapping]] = ..., crop_top: _Optional[int] = ..., crop_left: _Optional[int] = ..., target_size: _Optional[_Union[ImageSize, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "seed", "width", "height", "index")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    seed: int
    width: int
    height: int
    index: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "text_encoder_ms", "denoise_ms", "unet_ms", "vae_decode_ms", "image_encode_ms", "total_ms", "batch_size", "vae_encode_ms", "unet_calls")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    UNET_MS_FIELD_NUMBER: _ClassVar[int]
    VAE_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAE_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    text_encoder_ms: float
    denoise_ms: float
    unet_ms: float
    vae_decode_ms: float
    image_encode_ms: float
    total_ms: float
    batch_size: int
    vae_encode_ms: float
    unet_calls: int
    def __init__(self, queue_ms: _Optional[float] = ..., text_encoder_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., unet_ms: _Optional[float] = ..., vae_decode_ms: _Optional[float] = ..., image_encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., vae_encode_ms: _Optional[float] = ..., unet_calls: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model", "images", "timings", "steps", "guidance_scale", "scheduler", "noise_mode", "task", "strength", "prompt_tokens", "negative_prompt_tokens", "text_chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timings: Timings
    steps: int
    guidance_scale: float
    scheduler: Scheduler
    noise_mode: NoiseMode
    task: Task
    strength: float
    prompt_tokens: int
    negative_prompt_tokens: int
    text_chunks: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., noise_mode: _Optional[_Union[NoiseMode, str]] = ..., task: _Optional[_Union[Task, str]] = ..., strength: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., negative_prompt_tokens: _Optional[int] = ..., text_chunks: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "queued", "progress", "image", "completed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    progress: Progress
    image: Image
    completed: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., completed: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "depth")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    position: int
    depth: int
    def __init__(self, position: _Optional[int] = ..., depth: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "eta_ms", "previews")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ETA_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    eta_ms: float
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., eta_ms: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "prediction_type", "width", "height", "batch_size", "schedulers", "default_scheduler", "default_steps", "default_guidance_scale", "max_steps", "max_images", "backend", "precision", "batch_sizes", "sizes", "target", "tasks", "text_lengths", "max_prompt_tokens", "guidance_embedded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TEXT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    prediction_type: str
    width: int
    height: int
    batch_size: int
    schedulers: _containers.RepeatedScalarFieldContainer[Scheduler]
    default_scheduler: Scheduler
    default_steps: int
    default_guidance_scale: float
    max_steps: int
    max_images: int
    backend: str
    precision: str
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedCompositeFieldContainer[ImageSize]
    target: str
    tasks: _containers.RepeatedScalarFieldContainer[Task]
    text_lengths: _containers.RepeatedScalarFieldContainer[int]
    max_prompt_tokens: int
    guidance_embedded: bool
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., prediction_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., batch_size: _Optional[int] = ..., schedulers: _Optional[_Iterable[_Union[Scheduler, str]]] = ..., default_scheduler: _Optional[_Union[Scheduler, str]] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_images: _Optional[int] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[_Union[ImageSize, _Mapping]]] = ..., target: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, str]]] = ..., text_lengths: _Optional[_Iterable[int]] = ..., max_prompt_tokens: _Optional[int] = ..., guidance_embedded: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "backend", "providers", "default_model", "models", "runtime_versions", "queue_capacity", "queue_depth", "batching", "max_batch_wait_ms", "default_noise_mode", "device", "target", "backend_reason", "text_cache", "resident_memory_bytes", "gpu_memory_bytes")
    class RuntimeVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NOISE_MODE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BACKEND_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    default_model: str
    models: _containers.RepeatedScalarFieldContainer[str]
    runtime_versions: _containers.ScalarMap[str, str]
    queue_capacity: int
    queue_depth: int
    batching: bool
    max_batch_wait_ms: float
    default_noise_mode: NoiseMode
    device: str
    target: str
    backend_reason: str
    text_cache: TextEncoderCache
    resident_memory_bytes: int
    gpu_memory_bytes: int
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., default_model: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., runtime_versions: _Optional[_Mapping[str, str]] = ..., queue_capacity: _Optional[int] = ..., queue_depth: _Optional[int] = ..., batching: _Optional[bool] = ..., max_batch_wait_ms: _Optional[float] = ..., default_noise_mode: _Optional[_Union[NoiseMode, str]] = ..., device: _Optional[str] = ..., target: _Optional[str] = ..., backend_reason: _Optional[str] = ..., text_cache: _Optional[_Union[TextEncoderCache, _Mapping]] = ..., resident_memory_bytes: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class TextEncoderCache(_message.Message):
    __slots__ = ("hits", "misses", "hit_rate", "entries", "bytes", "max_entries", "max_bytes")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    hit_rate: float
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., max_entries: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...
