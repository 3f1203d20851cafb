"""`meissonic train-vq`: train a diffusers `VQModel` image tokenizer, as Meissonic's (f=16) or smaller.

Loss: L1 + L2 reconstruction, plus VQ-VAE's codebook and commitment terms, plus, when asked: the squared error in
the data's whitened colours (`--whitened-weight`), the error of each image's worst pixels (`--hard-pixel-weight`),
and a hinge-loss patch discriminator after `disc_start` steps. Codes can follow an EMA of their encoder outputs
(`--codebook-ema`); codes unused for `reset_dead_every` steps are re-seeded from the encoder outputs the codebook
fits worst. These additions are ours: small tokenizers on small, mostly plain data sets otherwise leave most of the
codebook dead and learn colours last. No perceptual (LPIPS) loss: its weights cannot be downloaded here.
Same determinism, checkpoints and resume as `meissonic train`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..loading import owned_tensors
from .checkpoint import append_metrics, read_state, resolve_resume, save_checkpoint, truncate_metrics
from .common import RunConfig, TrainingError, adamw, load_vqvae
from .data import SampleOrder, load_images, open_dataset, step_generator


@dataclass
class VQTrainConfig(RunConfig):
    """`meissonic train-vq`: `model` is a VQModel folder, or a pipeline folder (its vqvae/), to fine-tune;
    `preset` makes a new VQModel of that preset's tokenizer architecture."""

    resolution: int = 256
    crop_size: int | None = None  # train on random crops of this size at `resolution` scale (cheaper; the VQ is
    # convolutional, so it still tokenizes whole images)
    batch_size: int = 8
    max_steps: int = 2000
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    disc_weight: float = 0.0  # > 0: add a patch discriminator
    disc_start: int = 0
    reset_dead_every: int = 0  # > 0: re-seed codes unused over this many steps
    init_codebook: bool = False  # a new tokenizer starts its codebook from encoder outputs (--init-codebook)
    commitment: float = 0.25  # weight of the encoder's commitment term
    hard_pixel_weight: float = 0.0  # > 0: add the mean L1 error of each image's worst-reconstructed pixels
    hard_pixel_share: float = 0.05  # ... this share of them
    whitened_weight: float = 0.0  # > 0: add the squared error in the data's whitened colour space
    hue_jitter: float = 0.0  # share of training images whose hues are rotated by a random angle
    codebook_ema: float = 0.0  # > 0: codes follow an EMA of their assigned encoder outputs (VQ-VAE, van den Oord
    # et al. 2017, appendix) instead of the gradient of the codebook loss


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): strided 4x4 convs to a map of real/fake logits."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, layers):
            blocks += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def build_vqvae(cfg: VQTrainConfig):
    from diffusers import VQModel

    from ..presets import get_preset, seeded_init

    if (cfg.model is None) == (cfg.preset is None):
        raise TrainingError("give --model (a VQ or pipeline folder to fine-tune) or --preset (a new tokenizer)")
    if cfg.preset is not None:
        with seeded_init(cfg.seed):
            return VQModel(**get_preset(cfg.preset).vqvae)
    return load_vqvae(cfg.model, "--model")


def codebook_stats(indices: torch.Tensor, size: int) -> dict:
    """Share of the codebook used and the perplexity of code usage over `indices`."""
    counts = torch.bincount(indices.flatten(), minlength=size).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"codebook_usage": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}


def vq_forward(vqvae, images: torch.Tensor, commitment: float = 0.25):
    """Encode, quantize, decode: (reconstruction, quantizer loss, code indices (B*h*w,), pre-quant latents).

    The code of each latent is the nearest codebook row (as `VectorQuantizer` picks it at inference). The quantizer
    loss is VQ-VAE's (van den Oord et al. 2017): ||sg[z] - e||^2 moves the codes, `commitment` * ||z - sg[e]||^2
    keeps the encoder near them. diffusers' `VectorQuantizer(legacy=True)` puts beta on the codebook term instead,
    which pins a small encoder to a poor early codebook (colours were lost in our runs), so it is not used here.
    """
    latents = vqvae.encode(images).latents  # (B, C, h, w) after quant_conv
    batch, channels, height, width = latents.shape
    table = vqvae.quantize.embedding.weight
    indices = torch.cdist(_positions(latents), table.float()).argmin(dim=1)
    codes = vqvae.quantize.embedding(indices).view(batch, height, width, channels).permute(0, 3, 1, 2)
    loss = F.mse_loss(codes.float(), latents.detach().float())
    loss = loss + commitment * F.mse_loss(latents.float(), codes.detach().float())
    quantized = latents + (codes.to(latents.dtype) - latents).detach()  # straight-through gradient to the encoder
    # `decode(force_not_quantize=True)` would read its input as code ids (lookup_from_codebook): run its layers.
    spatial = quantized if vqvae.config.norm_type == "spatial" else None
    reconstruction = vqvae.decoder(vqvae.post_quant_conv(quantized), spatial)
    return reconstruction, loss, indices, latents


def _positions(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B*h*w, C) float32 vectors, in the order of the code indices."""
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()


def hard_pixel_loss(recon: torch.Tensor, images: torch.Tensor, share: float) -> torch.Tensor:
    """Mean L1 error (summed over RGB) of each image's `share` worst pixels (online hard example mining).

    Where small objects sit on large plain backgrounds, the plain loss is mostly background, and a small tokenizer
    learns the objects' shapes long before their colours; this term keeps the pixels it still gets wrong in view."""
    errors = (recon - images).abs().sum(dim=1).flatten(1)  # (B, H*W)
    count = max(1, round(errors.shape[1] * share))
    return errors.topk(count, dim=1).values.mean()


def rotate_hues(images: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate the colours of a random `share` of the images about the grey axis by a random angle (greys stay).

    A tokenizer is a codec: it should encode colour-shape pairs its data set lacks (the shapes data holds some out on
    purpose), and hue rotations show it every shape in every hue without adding a single captioned image."""
    chosen = torch.rand(len(images), generator=gen) < share
    angles = torch.rand(len(images), generator=gen) * 2 * math.pi
    axis = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    out = images.clone()
    for i in chosen.nonzero().flatten().tolist():  # Rodrigues' rotation matrix
        cos, sin = math.cos(angles[i]), math.sin(angles[i])
        rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * torch.outer(axis, axis)
        out[i] = torch.einsum("ij,jhw->ihw", rotation, images[i]).clamp(0, 1)
    return out


def colour_whitening(dataset, resolution: int, count: int = 64, floor: float = 1e-4) -> torch.Tensor:
    """The 3x3 matrix that whitens the pixel colours of the first `count` images (center crops).

    Reconstruction learns the colour directions of the data in order of their variance, and on mostly grey data the
    last hues need thousands of steps; measuring the error in whitened colours lets every direction learn alike."""
    images = load_images(dataset, list(range(min(count, len(dataset)))), resolution, None, True)[0]
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double()
    values, vectors = torch.linalg.eigh(torch.cov(pixels))
    return (vectors @ torch.diag(values.clamp(min=floor).rsqrt()) @ vectors.T).float()


def train_vq(cfg: VQTrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    from ..presets import seeded_init

    for name in ("resolution", "batch_size", "max_steps", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.resolution % 16:
        raise TrainingError(f"--resolution {cfg.resolution}: must be a multiple of 16")
    if not 0 <= cfg.hue_jitter <= 1:
        raise TrainingError(f"--hue-jitter {cfg.hue_jitter}: must lie in [0, 1]")
    if not 0 < cfg.hard_pixel_share <= 1:
        raise TrainingError(f"--hard-pixel-share {cfg.hard_pixel_share}: must lie in (0, 1]")
    if cfg.crop_size is not None and not (16 <= cfg.crop_size <= cfg.resolution and cfg.crop_size % 16 == 0):
        raise TrainingError(f"--crop-size {cfg.crop_size}: must be a multiple of 16, at most --resolution")
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    dataset = open_dataset(cfg.data, cfg.image_column, None, None)  # images only
    vqvae = build_vqvae(cfg).train()
    factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
    if cfg.resolution % factor:
        raise TrainingError(f"--resolution {cfg.resolution}: must be a multiple of the tokenizer's factor {factor}")
    codebook = vqvae.config.num_vq_embeddings
    with seeded_init(cfg.seed + 1):
        disc = PatchDiscriminator() if cfg.disc_weight else None
    if cfg.codebook_ema:
        vqvae.quantize.embedding.weight.requires_grad_(False)  # moved by the EMA below, not by the optimizer
    optimizer = adamw([p for p in vqvae.parameters() if p.requires_grad], cfg.learning_rate, cfg.weight_decay)
    disc_optimizer = adamw(disc.parameters(), cfg.learning_rate, 0.0) if disc else None
    usage = torch.zeros(codebook)
    ema_state = {"count": torch.ones(codebook), "sum": vqvae.quantize.embedding.weight.detach().clone().float()}
    start = 0
    checkpoints = cfg.out / "checkpoints"
    resume = resolve_resume(cfg.resume, checkpoints) if cfg.resume else None
    if resume is not None:
        start = int(read_state(resume)["step"])
        vqvae.load_state_dict(load_file(resume / "vqvae.safetensors"))
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        saved = owned_tensors(load_file(resume / "usage.safetensors"))  # kept: out of the file's memory map
        usage = saved["usage"]
        ema_state = {"count": saved["ema_count"], "sum": saved["ema_sum"]}
        if disc is not None:
            disc.load_state_dict(load_file(resume / "discriminator.safetensors"))
            disc_optimizer.load_state_dict(torch.load(resume / "disc_optimizer.pt", weights_only=True))
    if cfg.preset is not None and cfg.init_codebook and resume is None:
        _init_codebook(vqvae, dataset, cfg, order_seed=cfg.seed)
        _match_ema(ema_state, vqvae)
    vqvae, optimizer = accelerator.prepare(vqvae, optimizer)
    if disc is not None:
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    model = accelerator.unwrap_model(vqvae)
    device = accelerator.device
    whiten = colour_whitening(dataset, cfg.resolution) if cfg.whitened_weight else None
    order = SampleOrder(len(dataset), cfg.batch_size, cfg.seed, accelerator.process_index,
                        accelerator.num_processes)
    metrics_path = cfg.out / "metrics.jsonl"
    if accelerator.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start)
        (cfg.out / "train_vq_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process),
               desc="train-vq", unit="step")
    for step in range(start, cfg.max_steps):
        began = time.perf_counter()
        gen = step_generator(cfg.seed, step, 0, accelerator.process_index)
        indices_batch, epoch = order(step)
        images = load_images(dataset, indices_batch, cfg.resolution, gen, cfg.center_crop, cfg.crop_size)[0]
        if cfg.hue_jitter:
            images = rotate_hues(images, cfg.hue_jitter, gen)
        images = images.to(device)
        with accelerator.autocast():
            recon, commit, codes, latents = vq_forward(model, images, cfg.commitment)
            recon = recon.float()
            l1, l2 = (recon - images).abs().mean(), F.mse_loss(recon, images)
            loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + commit.float()
            if cfg.whitened_weight:
                error = torch.einsum("ij,bjhw->bihw", whiten.to(device), recon - images)
                loss = loss + cfg.whitened_weight * error.pow(2).mean()
            if cfg.hard_pixel_weight:
                loss = loss + cfg.hard_pixel_weight * hard_pixel_loss(recon, images, cfg.hard_pixel_share)
            gan = torch.zeros((), device=device)
            if disc is not None and step >= cfg.disc_start:
                gan = -disc(recon).mean()
                loss = loss + cfg.disc_weight * gan
        if not math.isfinite(loss.item()):
            raise TrainingError(f"loss became {loss.item()} at step {step + 1}; the last good checkpoint is kept in "
                                f"{checkpoints}")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vqvae.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        disc_loss = 0.0
        if disc is not None and step >= cfg.disc_start:
            with accelerator.autocast():
                d = F.relu(1 - disc(images)).mean() + F.relu(1 + disc(recon.detach())).mean()
            accelerator.backward(d)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss = d.item()
        usage += torch.bincount(codes.flatten().cpu(), minlength=codebook).float()
        if cfg.codebook_ema:
            _ema_codebook(model, ema_state, latents.detach(), codes, cfg.codebook_ema)
        done = step + 1
        if cfg.reset_dead_every and done % cfg.reset_dead_every == 0:
            _reset_dead_codes(model, usage, latents.detach(), gen)
            _match_ema(ema_state, model)
            usage.zero_()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{l2.item():.5f}")
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
            record = {"step": done, "loss": loss.item(), "l1": l1.item(), "mse": l2.item(),
                      "psnr": (-10 * torch.log10(l2.detach().clamp(min=1e-10))).item(), "commit": commit.item(),
                      "gan": gan.item(), "disc": disc_loss, "epoch": epoch, "lr": cfg.learning_rate,
                      "samples_per_s": cfg.batch_size * accelerator.num_processes / (time.perf_counter() - began),
                      **codebook_stats(codes.cpu(), codebook)}
            append_metrics(metrics_path, record)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                unwrapped_disc = accelerator.unwrap_model(disc) if disc is not None else None
                save_checkpoint(checkpoints, done, lambda folder: _write(folder, model, optimizer, usage, ema_state,
                                                                         unwrapped_disc, disc_optimizer),
                                {"seed": cfg.seed}, cfg.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(cfg.out / "vqvae")
        report = evaluate_vq(model.eval(), dataset, cfg.resolution, device)
        (cfg.out / "vq_report.json").write_text(json.dumps(report, indent=2) + "\n")
    accelerator.end_training()
    return cfg.out


def _write(folder: Path, model, optimizer, usage, ema_state, disc, disc_optimizer) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "vqvae.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    save_file({"usage": usage, "ema_count": ema_state["count"], "ema_sum": ema_state["sum"]},
              folder / "usage.safetensors")
    if disc is not None:
        save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, folder / "discriminator.safetensors")
        torch.save(disc_optimizer.state_dict(), folder / "disc_optimizer.pt")


@torch.no_grad()
def _init_codebook(model, dataset, cfg: VQTrainConfig, order_seed: int) -> None:
    """Data-dependent start: codes copied from encoder outputs of a few images (diffusers' default, uniform in
    +-1/K, leaves nearly every latent on one code, and the decoder learns the mean image)."""
    codebook = model.config.num_vq_embeddings
    gen = torch.Generator().manual_seed(order_seed * 7919 + 1)
    indices = torch.randperm(len(dataset), generator=gen)[:max(cfg.batch_size, 8)].tolist()
    images = load_images(dataset, indices, cfg.resolution, gen, cfg.center_crop, cfg.crop_size)[0]
    latents = model.encode(images.to(model.device, model.dtype)).latents
    _reset_dead_codes(model, torch.zeros(codebook), latents, gen)


def _match_ema(state: dict, model) -> None:
    """After codes were set directly, make the EMA averages agree with them."""
    state["sum"] = model.quantize.embedding.weight.detach().float().cpu() * state["count"][:, None]


@torch.no_grad()
def _ema_codebook(model, state: dict, latents: torch.Tensor, codes: torch.Tensor, decay: float) -> None:
    """codes <- EMA(sum of assigned latents) / EMA(count), with Laplace smoothing of the counts."""
    vectors = _positions(latents).cpu()
    codes = codes.flatten().cpu()
    size = state["count"].shape[0]
    counts = torch.bincount(codes, minlength=size).float()
    sums = torch.zeros_like(state["sum"]).index_add_(0, codes, vectors)
    state["count"].mul_(decay).add_(counts, alpha=1 - decay)
    state["sum"].mul_(decay).add_(sums, alpha=1 - decay)
    total = state["count"].sum()
    smoothed = (state["count"] + 1e-5) / (total + size * 1e-5) * total
    weight = model.quantize.embedding.weight
    weight.copy_((state["sum"] / smoothed[:, None]).to(weight.device, weight.dtype))


@torch.no_grad()
def _reset_dead_codes(model, usage: torch.Tensor, latents: torch.Tensor, gen: torch.Generator) -> None:
    """Codes unused since the last reset move onto encoder outputs of this batch, drawn with probability in
    proportion to their squared distance from the codebook: latents the codebook fits worst (small objects,
    rare colours) get codes, not yet more copies of the background."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    table = model.quantize.embedding.weight
    vectors = _positions(latents)  # encoder outputs
    error = torch.cdist(vectors, table.float()).min(dim=1).values.pow(2).cpu()
    picks = torch.multinomial(error + 1e-12, len(dead), replacement=True, generator=gen)
    table[dead.to(table.device)] = vectors[picks.to(vectors.device)].to(table.dtype)


@torch.no_grad()
def evaluate_vq(model, dataset, resolution: int, device, limit: int = 256, batch: int = 16) -> dict:
    """Reconstruction error and codebook use over (up to `limit`) samples, center-cropped."""
    n = min(len(dataset), limit)
    errors, codes = [], []
    for start in range(0, n, batch):
        images = load_images(dataset, list(range(start, min(start + batch, n))), resolution, None, True)[0]
        recon, _, indices, _ = vq_forward(model, images.to(device))
        errors.append(((recon.float().clamp(0, 1) - images.to(device)) ** 2).mean(dim=(1, 2, 3)).cpu())
        codes.append(indices.cpu())
    mse = torch.cat(errors).mean().item()
    return {"samples": n, "mse": mse, "psnr": -10 * math.log10(max(mse, 1e-10)),
            **codebook_stats(torch.cat(codes), model.config.num_vq_embeddings)}
