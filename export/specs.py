"""Each component's I/O contract as data; the wrappers, ONNX export, parity gate and manifest all derive from it."""

from __future__ import annotations

from dataclasses import dataclass

from diffuserve.engine.manifest import (
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LATENT_LOGVAR,
    LATENT_MEAN,
    LATENT_SAMPLE,
    MODEL_OUTPUT,
    PENULTIMATE_HIDDEN_STATE,
    SAMPLE,
    TEXT_EMBEDS,
    TIME_IDS,
    TIMESTEP,
    TIMESTEP_COND,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    Size,
    TensorSpec,
)

F32 = "float32"


@dataclass(frozen=True)
class TextEncoderDims:
    """One text encoder: its width and which of its outputs the U-Net is conditioned on."""

    name: str
    hidden_size: int
    # SD 1.x/2.x read the last hidden state (after the final layer norm); SDXL reads the penultimate one.
    penultimate: bool = False
    # Width of the pooled, projected embedding the U-Net's added conditioning takes (SDXL's second encoder); 0: none.
    pooled_dim: int = 0

    @property
    def hidden_output(self) -> str:
        return PENULTIMATE_HIDDEN_STATE if self.penultimate else LAST_HIDDEN_STATE


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a model that fix its tensors' shapes, read from its configs."""

    text_seq_len: int
    text_encoders: tuple[TextEncoderDims, ...]
    vocab_size: int
    latent_channels: int
    unet_in_channels: int
    unet_out_channels: int
    cross_attention_dim: int
    image_channels: int
    vae_downsample: int
    unet_downsample: int
    num_train_timesteps: int
    # SDXL's added time ids (original size, crop top-left, target size: 6 numbers); 0 for other families.
    time_ids: int = 0
    # Width of LCM's guidance-scale embedding (the U-Net's timestep_cond); 0 for U-Nets without one.
    timestep_cond_dim: int = 0

    @property
    def text_embeds_dim(self) -> int:
        return sum(encoder.pooled_dim for encoder in self.text_encoders)


def check_image_size(dims: ModelDims, height: int, width: int) -> None:
    """The U-Net halves the latents at each level, so the image must divide evenly all the way down."""
    multiple = dims.vae_downsample * dims.unet_downsample
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ValueError(
                f"--size {width}x{height}: {name} must be a positive multiple of {multiple} for this model"
            )


def check_text_length(dims: ModelDims, length: int) -> None:
    """A long prompt is whole chunks of the encoder's length, so the U-Net's text length is a multiple of it."""
    if length <= 0 or length % dims.text_seq_len:
        raise ValueError(
            f"--text-length {length}: must be a positive multiple of the text encoder's {dims.text_seq_len} tokens"
        )


def latent_size(dims: ModelDims, size: Size) -> tuple[int, int]:
    """(height, width) of the latents of an image of size (width, height)."""
    width, height = size
    check_image_size(dims, height, width)
    return height // dims.vae_downsample, width // dims.vae_downsample


def text_encoder_spec(dims: ModelDims, encoder: TextEncoderDims, batch: int) -> ComponentSpec:
    """Token ids in, one hidden state per token out (and the pooled embedding, where the U-Net takes it)."""
    outputs = [TensorSpec(encoder.hidden_output, (batch, dims.text_seq_len, encoder.hidden_size), F32)]
    if encoder.pooled_dim:
        outputs.append(TensorSpec(TEXT_EMBEDS, (batch, encoder.pooled_dim), F32))
    return ComponentSpec(
        encoder.name, inputs=(TensorSpec(INPUT_IDS, (batch, dims.text_seq_len), "int32"),), outputs=tuple(outputs)
    )


def unet_spec(dims: ModelDims, size: Size, rows: int, text_length: int) -> ComponentSpec:
    """One U-Net call of `rows` rows: a batch's images, twice over under classifier-free guidance."""
    latent_h, latent_w = latent_size(dims, size)
    inputs = [
        TensorSpec(SAMPLE, (rows, dims.unet_in_channels, latent_h, latent_w), F32),
        # One timestep per row, float: Euler-family timesteps are fractional.
        TensorSpec(TIMESTEP, (rows,), F32),
        TensorSpec(ENCODER_HIDDEN_STATES, (rows, text_length, dims.cross_attention_dim), F32),
    ]
    if dims.time_ids:
        inputs.append(TensorSpec(TEXT_EMBEDS, (rows, dims.text_embeds_dim), F32))
        inputs.append(TensorSpec(TIME_IDS, (rows, dims.time_ids), F32))
    if dims.timestep_cond_dim:
        inputs.append(TensorSpec(TIMESTEP_COND, (rows, dims.timestep_cond_dim), F32))
    return ComponentSpec(
        UNET,
        inputs=tuple(inputs),
        outputs=(TensorSpec(MODEL_OUTPUT, (rows, dims.unet_out_channels, latent_h, latent_w), F32),),
    )


def vae_specs(dims: ModelDims, size: Size, batch: int) -> dict[str, ComponentSpec]:
    latent_h, latent_w = latent_size(dims, size)
    image = (batch, dims.image_channels, size[1], size[0])
    latent = (batch, dims.latent_channels, latent_h, latent_w)
    return {
        VAE_DECODER: ComponentSpec(
            VAE_DECODER, inputs=(TensorSpec(LATENT_SAMPLE, latent, F32),), outputs=(TensorSpec(SAMPLE, image, F32),)
        ),
        VAE_ENCODER: ComponentSpec(
            VAE_ENCODER,
            inputs=(TensorSpec(SAMPLE, image, F32),),
            # The distribution's parameters, not a sample: the caller draws the noise from its own generator.
            outputs=(TensorSpec(LATENT_MEAN, latent, F32), TensorSpec(LATENT_LOGVAR, latent, F32)),
        ),
    }
