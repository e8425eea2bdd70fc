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
    SAMPLE,
    TEXT_ENCODER,
    TIMESTEP,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    TensorSpec,
)


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Stable Diffusion 1.x/2.x model that fix its tensors' shapes, read from its configs."""

    text_seq_len: int
    text_hidden_size: int
    vocab_size: int
    latent_channels: int
    unet_out_channels: int
    cross_attention_dim: int
    image_channels: int
    vae_downsample: int
    unet_downsample: int
    num_train_timesteps: int


def check_image_size(dims: ModelDims, height: int, width: int) -> None:
    """The U-Net halves the latents at each level, so the image must divide evenly all the way down."""
    multiple = dims.vae_downsample * dims.unet_downsample
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ValueError(
                f"--size {width}x{height}: {name} must be a positive multiple of {multiple} for this model"
            )


def component_specs(dims: ModelDims, height: int, width: int, batch: int) -> dict[str, ComponentSpec]:
    """Static-shape contracts for one image size and batch; the U-Net runs at 2*batch for classifier-free guidance."""
    check_image_size(dims, height, width)
    latent_h, latent_w = height // dims.vae_downsample, width // dims.vae_downsample
    unet_batch = 2 * batch
    image = (dims.image_channels, height, width)
    latent = (dims.latent_channels, latent_h, latent_w)
    f32 = "float32"
    return {
        TEXT_ENCODER: ComponentSpec(
            TEXT_ENCODER,
            inputs=(TensorSpec(INPUT_IDS, (batch, dims.text_seq_len), "int32"),),
            outputs=(TensorSpec(LAST_HIDDEN_STATE, (batch, dims.text_seq_len, dims.text_hidden_size), f32),),
        ),
        UNET: ComponentSpec(
            UNET,
            inputs=(
                TensorSpec(SAMPLE, (unet_batch, *latent), f32),
                # One timestep per row, float: Euler-family timesteps are fractional.
                TensorSpec(TIMESTEP, (unet_batch,), f32),
                TensorSpec(ENCODER_HIDDEN_STATES, (unet_batch, dims.text_seq_len, dims.cross_attention_dim), f32),
            ),
            outputs=(TensorSpec(MODEL_OUTPUT, (unet_batch, dims.unet_out_channels, latent_h, latent_w), f32),),
        ),
        VAE_DECODER: ComponentSpec(
            VAE_DECODER,
            inputs=(TensorSpec(LATENT_SAMPLE, (batch, *latent), f32),),
            outputs=(TensorSpec(SAMPLE, (batch, *image), f32),),
        ),
        VAE_ENCODER: ComponentSpec(
            VAE_ENCODER,
            inputs=(TensorSpec(SAMPLE, (batch, *image), f32),),
            # The distribution's parameters, not a sample: the caller draws the noise from its own generator.
            outputs=(
                TensorSpec(LATENT_MEAN, (batch, *latent), f32),
                TensorSpec(LATENT_LOGVAR, (batch, *latent), f32),
            ),
        ),
    }
