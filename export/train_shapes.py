"""Trains the bundled shapes model from scratch: a tiny Stable Diffusion 1.x (CLIP text encoder, cross-attention
U-Net, 8x AutoencoderKL) on synthetic scenes of coloured shapes. Deterministic for a given seed and machine.

    python -m diffuserve.export.train_shapes -o models/shapes-sd
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffuserve.server.tools.shapes import Scene, describe, random_scene, render

from .sd_folder import save_sd_folder

# The CLIP BPE data (vocab.json, merges.txt, its licence), kept once, in the committed model's own tokenizer folder.
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-sd" / "tokenizer"
# SD 1.x's noise schedule, so the model runs under the same samplers as real SD checkpoints.
SD1_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 64
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    # Scenes encoded once for U-Net training; fresh wordings are drawn for them every step.
    dataset_size: int = 8192
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    # Share of captions dropped to "", which teaches the unconditional prediction classifier-free guidance needs.
    prompt_dropout: float = 0.1
    # Min-SNR weighting (Hang et al. 2023): caps the weight of low-noise steps, which otherwise dominate the loss.
    min_snr_gamma: float = 5.0
    warmup_steps: int = 100
    device: str = "cpu"


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet(image_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


class Progress:
    """One line per interval: stage, step, smoothed loss, elapsed and remaining time."""

    def __init__(self, stage: str, total: int, every: int = 50):
        self.stage, self.total, self.every = stage, total, every
        self.start = time.perf_counter()
        self.loss = None

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        if (step + 1) % self.every and step + 1 != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (step + 1) * (self.total - step - 1)
        print(
            f"{self.stage}: {step + 1}/{self.total} loss {self.loss:.4f} "
            f"elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min",
            file=sys.stderr,
            flush=True,
        )


def images_to_tensor(images: list[np.ndarray], device: str) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in -1..1, SD's pixel range."""
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device)


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to a tenth

    return factor


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: plain pixel losses forgive blurred edges, and edges are what shapes are made of."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def train_vae(config: TrainConfig, rng: np.random.Generator):
    vae = build_vae().to(config.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.vae_steps))
    progress = Progress("vae", config.vae_steps)
    for step in range(config.vae_steps):
        scenes = [random_scene(rng) for _ in range(config.vae_batch)]
        x = images_to_tensor([render(scene, config.image_size) for scene in scenes], config.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # KL weight 1e-6 as in SD's VAE: a near-deterministic code with a gently bounded scale.
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + edge_l1(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step, loss.item())
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, config: TrainConfig, rng: np.random.Generator) -> tuple[list[Scene], torch.Tensor, float]:
    """Scenes, their latent means, and the scaling factor that gives the latents unit variance (SD's convention)."""
    scenes = [random_scene(rng) for _ in range(config.dataset_size)]
    latents = []
    for start in range(0, len(scenes), 256):
        images = [render(s, config.image_size) for s in scenes[start : start + 256]]
        latents.append(vae.encode(images_to_tensor(images, config.device)).latent_dist.mean)
    latents = torch.cat(latents)
    return scenes, latents, float(1.0 / latents.std())


def train_denoiser(config, tokenizer, scenes, latents, rng: np.random.Generator):
    text_encoder = build_text_encoder(tokenizer).to(config.device).train()
    unet = build_unet(config.image_size).to(config.device).train()
    # The token table is 49,408 rows of which a few dozen ever appear: left at its random init, it still gives each
    # word a distinct vector, and the layers above learn what they mean.
    text_encoder.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in (*unet.parameters(), *text_encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.unet_steps))
    sqrt_betas = torch.linspace(
        SD1_BETAS["beta_start"] ** 0.5, SD1_BETAS["beta_end"] ** 0.5, 1000, dtype=torch.float64
    )
    betas = sqrt_betas**2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(config.device)
    generator = torch.Generator(config.device).manual_seed(config.seed)
    progress = Progress("denoiser", config.unet_steps)
    for step in range(config.unet_steps):
        index = rng.integers(len(scenes), size=config.unet_batch)
        captions = ["" if rng.random() < config.prompt_dropout else describe(scenes[i], rng) for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(config.device)  # fmt: skip
        x0 = latents[torch.from_numpy(index).to(config.device)]
        t = torch.randint(0, 1000, (config.unet_batch,), generator=generator, device=config.device)
        noise = torch.randn(x0.shape, generator=generator, device=config.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = torch.clamp(snr, max=config.min_snr_gamma) / snr
        loss = (weight * ((prediction - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step, loss.item())
    return text_encoder.eval(), unet.eval()


def save_model(
    out: Path, vae, text_encoder, tokenizer, unet, config: TrainConfig, record: dict, tokenizer_files: dict[str, bytes]
) -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD1_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if out.exists():
        shutil.rmtree(out)
    # Stored in fp16 to halve the repository's copy (fp32 was 34 MB); export loads them back as fp32, so the shipped
    # engines and every measurement are of these rounded weights.
    modules = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}
    save_sd_folder(out, **modules, dtype=torch.float16)
    # transformers writes a 3.6 MB tokenizer.json; the BPE files it was read from say the same in 1.5 MB.
    shutil.rmtree(out / "tokenizer")
    (out / "tokenizer").mkdir()
    for name, data in tokenizer_files.items():
        (out / "tokenizer" / name).write_bytes(data)
    (out / "training.json").write_text(json.dumps({"config": asdict(config), **record}, indent=2) + "\n")


def train(config: TrainConfig, out: Path) -> dict:
    from transformers import CLIPTokenizer

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    # Read now: training into models/shapes-sd replaces the folder they live in.
    tokenizer_files = {path.name: path.read_bytes() for path in CLIP_TOKENIZER_DIR.iterdir() if path.is_file()}
    timings = {}
    start = time.perf_counter()
    vae = train_vae(config, rng)
    timings["vae_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scenes, latents, scaling_factor = encode_dataset(vae, config, rng)
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    timings["encode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    text_encoder, unet = train_denoiser(config, tokenizer, scenes, latents, rng)
    timings["denoiser_s"] = time.perf_counter() - start
    record = {
        "command": " ".join(["python -m diffuserve.export.train_shapes", *sys.argv[1:]]),
        "seconds": timings,
        "total_minutes": sum(timings.values()) / 60,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "vae_scaling_factor": scaling_factor,
    }
    save_model(out, vae, text_encoder, tokenizer, unet, config, record, tokenizer_files)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="diffusers folder to write")
    defaults = TrainConfig()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("output"))
    record = train(TrainConfig(**args), out)
    print(f"wrote {out} in {record['total_minutes']:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
