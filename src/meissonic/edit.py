"""Image editing with a text-to-image Meissonic, zero-shot (arXiv 2410.08261): image-to-image, inpainting, outpainting.

Each task only builds the initial token grid (the image's own tokens where they are kept, the mask id where the model
draws) and calls the pipeline, hence the one sampler (`meissonic.sampler.decode`), which never re-masks a known token.

- `img2img`: tokenize the image, re-mask a random `strength` share of its tokens.
- `inpaint`: re-mask the tokens under a mask (white = repaint), optionally grown; paste the kept pixels back.
- `outpaint`: put the image on a larger canvas, mask the new area, then as `inpaint`.

Deviations from the reference: its img2img masks almost nothing at strength 1 (it reads the schedule at the wrong
end); here `strength` is exactly the share of tokens re-masked. Its inpainting pipeline switches the shared scheduler
to the linear schedule for good; here the schedule is a per-call option. Both resize the mask straight to the token
grid; here a token is repainted when any pixel of its patch is masked, so nothing the user masked is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .pipeline import per_image_generators, prompt_list
from .sizes import SizeError, check_request
from .speeds import LEVELS
from .vq import decode_tokens, encode_image

ImageInput = str | Path | Image.Image


class EditError(ValueError):
    """A problem with an edit's input (image, mask, strength, canvas), naming the value and what is allowed."""


# ---------------------------------------------------------------------------------------------- reading images


def open_image(source: ImageInput, what: str = "image") -> Image.Image:
    """A path or PIL image -> a loaded PIL image; unreadable, truncated or empty files raise `EditError`."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise EditError(f"{what} {str(path)!r}: no such file")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EditError(f"cannot read {what} {str(path)!r}: {reason}") from None
    if image.width == 0 or image.height == 0:
        raise EditError(f"{what} is {image.width}x{image.height}: it holds no pixels")
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled to 8 bits (Pillow's own conversion clips them to white)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray((values / top * 255).round().clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over `background`, 16-bit grey scaled, CMYK and palettes converted."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W) bool, True = repaint: white (over black where transparent) counts, >= 50% grey."""
    rgb = to_rgb(image, background=(0, 0, 0))
    return np.asarray(rgb.convert("L")) >= 128


def read_mask(mask_image: ImageInput | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask (path, PIL image or (H, W) array; white/True = repaint) for an image of `size` (W, H) -> (H, W) bool.

    Refuses a mask of another size, an empty one (nothing to repaint) and a full one (nothing kept)."""
    if isinstance(mask_image, np.ndarray):
        mask = mask_image.astype(bool)
        shown = "x".join(map(str, mask.shape[::-1])) if mask.ndim == 2 else f"an array of shape {mask.shape}"
    else:
        opened = open_image(mask_image, "mask")
        mask, shown = to_mask(opened), f"{opened.width}x{opened.height}"
    if mask.ndim != 2 or (mask.shape[1], mask.shape[0]) != tuple(size):
        raise EditError(f"the mask is {shown} but the image is {size[0]}x{size[1]}: they must match")
    if not mask.any():
        raise EditError("the mask is empty (all black): nothing to repaint")
    if mask.all():
        raise EditError("the mask covers the whole image: nothing would be kept (use generate, or img2img with "
                        "strength 1)")
    return mask


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(W, H) and a box (x0, y0, x1, y1), x1/y1 exclusive -> (H, W) bool mask, True inside the box."""
    width, height = size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise EditError(f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                        f"(the image is {width}x{height})")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------- sizes


def fit_size(pipe, width: int, height: int) -> tuple[int, int]:
    """The size the model works at for an image of (width, height): the same size rounded to the tokenizer's patch,
    or, when a side exceeds the model's limit, scaled down to its default resolution on the longer side."""
    f, limit = pipe.vae_scale_factor, pipe.max_side
    if max(width, height) > limit:
        scale = pipe.defaults["resolution"] / max(width, height)
        width, height = width * scale, height * scale
    return max(f, round(width / f) * f), max(f, round(height / f) * f)


def _size(pipe, image: Image.Image, width: int | None, height: int | None, images: int, kwargs: dict
          ) -> tuple[int, int]:
    fitted = fit_size(pipe, image.width, image.height)
    size = (fitted[0] if width is None else width, fitted[1] if height is None else height)
    pipe.check_size(size[1], size[0])
    _check_request(pipe, size, images, kwargs)
    return size


def _check_request(pipe, size: tuple[int, int], images: int, kwargs: dict) -> None:
    """The size rule (`meissonic.sizes`) before the image is tokenized; the pipeline call warns later."""
    cached = kwargs.get("step_cache") is not None or LEVELS.get(kwargs.get("speed"), {}).get("step_cache") is not None
    try:
        check_request(pipe, *size, images, cached=cached, warn=False)
    except SizeError as err:
        raise EditError(str(err)) from None


# ---------------------------------------------------------------------------------------------- token grids


def image_tokens(pipe, image: Image.Image) -> torch.Tensor:
    """An RGB image whose sides are multiples of the patch -> its token grid (1, h, w)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return encode_image(pipe.vqvae, pixels.to(pipe._execution_device))


def token_mask(mask: np.ndarray, patch: int, grow: int = 0) -> torch.Tensor:
    """Pixel mask (H, W) -> token mask (h, w): a token is repainted when any pixel of its patch is; then dilated by
    `grow` tokens."""
    pixels = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    tokens = F.max_pool2d(pixels, patch)  # (1, 1, h, w)
    if grow > 0:
        tokens = F.max_pool2d(tokens, 2 * grow + 1, stride=1, padding=grow)
    return tokens[0, 0] > 0.5


def remask_random(tokens: torch.Tensor, strength: float, mask_id: int, generators: list[torch.Generator]):
    """Re-mask `round(strength * h * w)` tokens of each grid (B, h, w), chosen uniformly with that image's generator."""
    batch, height, width = tokens.shape
    count = round(strength * height * width)
    out = tokens.clone().reshape(batch, -1)
    for b in range(batch):
        order = torch.rand(height * width, generator=generators[b], device=generators[b].device).argsort()
        out[b, order[:count].to(out.device)] = mask_id
    return out.reshape(batch, height, width)


def edit_steps(steps: int, share: float) -> int:
    """Sampling steps for an edit that redraws `share` of the tokens (as diffusers' img2img): ceil(steps * share)."""
    return max(1, math.ceil(steps * share))


# ---------------------------------------------------------------------------------------------- compositing


def soft_alpha(mask: np.ndarray, kept: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight of the generated pixels (H, W) in [0, 1]: 1 on the mask, falling to 0 over `feather` pixels
    outside it, and 0 wherever the tokens were kept (there the generated pixels are only the tokenizer's copy)."""
    alpha = mask.astype(np.float32)
    if feather > 0:
        grown = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * (feather // 2) + 1))
        blurred = np.asarray(grown.filter(ImageFilter.GaussianBlur(feather / 2)), dtype=np.float32) / 255
        alpha = np.maximum(alpha, blurred)
    return np.where(kept, 0.0, alpha)


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    a = alpha[..., None]
    mixed = np.asarray(original, dtype=np.float32) * (1 - a) + np.asarray(generated, dtype=np.float32) * a
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- the tasks


@dataclass
class EditOutput:
    """`images`: the results (PIL); `tokens`: their token grids (B, h, w); `masked`: which tokens were regenerated."""

    images: list[Image.Image]
    tokens: torch.Tensor
    masked: torch.Tensor


def _sample(pipe, prompts, grid, generators, steps, kwargs) -> tuple[list[Image.Image], torch.Tensor]:
    """Run the pipeline from `grid` (B, h, w); returns the decoded images and the final tokens."""
    tokens = pipe(prompt=prompts, latents=grid, num_images_per_prompt=grid.shape[0] // len(prompts),
                  num_inference_steps=steps, generator=generators, output_type="latent", **kwargs).images
    images = pipe.image_processor.postprocess(decode_tokens(pipe.vqvae, tokens, tile=pipe.vq_tile), output_type="pil")
    return images, tokens


def img2img(pipe, prompt: str | list[str], image: ImageInput, strength: float = 0.6,
            width: int | None = None, height: int | None = None, num_inference_steps: int | None = None,
            num_images_per_prompt: int = 1, generator=None, **kwargs) -> EditOutput:
    """Regenerate a random `strength` share of the image's tokens under the prompt.

    `strength=0` returns the image as the tokenizer reproduces it (no sampling); `strength=1` draws everything anew.
    Sampling takes ceil(steps * strength) steps. Other keyword arguments go to the pipeline (guidance_scale,
    negative_prompt, temperature, masking_schedule, ...).
    """
    if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise EditError(f"strength={strength!r} must be a number in [0, 1]")
    prompts = prompt_list(prompt, EditError)
    source = to_rgb(open_image(image))
    batch = len(prompts) * num_images_per_prompt
    size = _size(pipe, source, width, height, batch, kwargs)
    generators = per_image_generators(generator, batch, error=EditError)
    tokens = image_tokens(pipe, source.resize(size, Image.LANCZOS)).expand(batch, -1, -1)
    grid = remask_random(tokens, strength, pipe.scheduler.config.mask_token_id, generators)
    masked = grid == pipe.scheduler.config.mask_token_id
    steps = edit_steps(num_inference_steps or pipe.defaults["steps"], float(strength))
    images, out = _sample(pipe, prompts, grid, generators, steps, kwargs)
    return EditOutput(images, out, masked)


def inpaint(pipe, prompt: str | list[str], image: ImageInput, mask_image: ImageInput | np.ndarray,
            grow: int = 0, keep_unmasked: bool = True, feather: int | None = None,
            width: int | None = None, height: int | None = None, num_inference_steps: int | None = None,
            num_images_per_prompt: int = 1, generator=None, **kwargs) -> EditOutput:
    """Repaint the part of `image` under `mask_image` (white = repaint; any mode Pillow reads, or an (H, W) bool array).

    The mask must have the image's size. Tokens touched by the mask (grown by `grow` tokens) are regenerated; the
    others never change. With `keep_unmasked` (default) the result's unmasked pixels are the input's own, blended
    into the new ones over `feather` pixels (default: half a token).
    """
    if not isinstance(grow, int) or grow < 0:
        raise EditError(f"grow={grow!r} must be a whole number of tokens >= 0")
    source = to_rgb(open_image(image))
    mask = read_mask(mask_image, source.size)
    prompts = prompt_list(prompt, EditError)
    size = _size(pipe, source, width, height, len(prompts) * num_images_per_prompt, kwargs)
    original = (source, mask)
    if size != source.size:  # the model works at `size`; the composited result comes back at the input's size
        source = source.resize(size, Image.LANCZOS)
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return _repaint(pipe, prompts, source, mask, grow, keep_unmasked, feather, num_inference_steps,
                    num_images_per_prompt, generator, kwargs, original)


def outpaint(pipe, prompt: str | list[str], image: ImageInput, left: int = 0, right: int = 0, top: int = 0,
             bottom: int = 0, expand: tuple[int, int] | None = None, keep_unmasked: bool = True,
             feather: int | None = None, num_inference_steps: int | None = None, num_images_per_prompt: int = 1,
             generator=None, **kwargs) -> EditOutput:
    """Extend the canvas by `left`/`right`/`top`/`bottom` pixels, or centred to `expand=(width, height)`, and draw
    the new area. Margins are rounded up so the canvas is a multiple of the tokenizer's patch; the image keeps its
    pixels (tokens it only partly covers are drawn, then its pixels pasted back as in `inpaint`)."""
    source = to_rgb(open_image(image))
    f = pipe.vae_scale_factor
    if expand is not None:
        if any((left, right, top, bottom)):
            raise EditError("give either expand or left/right/top/bottom, not both")
        target_w, target_h = expand
        if target_w < source.width or target_h < source.height:
            raise EditError(f"expand={target_w}x{target_h} is smaller than the image ({source.width}x{source.height})")
        left, top = (target_w - source.width) // 2, (target_h - source.height) // 2
        right, bottom = target_w - source.width - left, target_h - source.height - top
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if not isinstance(value, int) or value < 0:
            raise EditError(f"{name}={value!r} must be a whole number of pixels >= 0")
    if not any((left, right, top, bottom)):
        raise EditError("nothing to extend: give left/right/top/bottom margins or expand")
    left, top = -(-left // f) * f, -(-top // f) * f
    width = -(-(left + source.width + right) // f) * f
    height = -(-(top + source.height + bottom) // f) * f
    prompts = prompt_list(prompt, EditError)
    _check_request(pipe, (width, height), len(prompts) * num_images_per_prompt, kwargs)
    canvas = Image.new("RGB", (width, height), (127, 127, 127))
    canvas.paste(source, (left, top))
    mask = np.ones((height, width), dtype=bool)
    mask[top:top + source.height, left:left + source.width] = False
    return _repaint(pipe, prompts, canvas, mask, 0, keep_unmasked, feather,
                    num_inference_steps, num_images_per_prompt, generator, kwargs)


def _repaint(pipe, prompts, source, mask, grow, keep_unmasked, feather, steps, num_images, generator, kwargs,
             original=None) -> EditOutput:
    """Shared by inpaint and outpaint: mask the tokens under `mask` (H, W), sample, paste the kept pixels back (onto
    `original` = (image, mask) at the user's size when the model worked at another)."""
    f = pipe.vae_scale_factor
    batch = len(prompts) * num_images
    generators = per_image_generators(generator, batch, error=EditError)
    masked = token_mask(mask, f, grow).to(pipe._execution_device)  # (h, w)
    tokens = image_tokens(pipe, source)  # (1, h, w)
    grid = torch.where(masked, pipe.scheduler.config.mask_token_id, tokens).expand(batch, -1, -1)
    share = masked.float().mean().item()
    images, out = _sample(pipe, prompts, grid, generators, edit_steps(steps or pipe.defaults["steps"], share), kwargs)
    if keep_unmasked:
        target, target_mask = original or (source, mask)
        redrawn = np.asarray(Image.fromarray(masked.cpu().numpy()).resize(target.size, Image.NEAREST))  # (H, W)
        region = target_mask if grow == 0 else redrawn  # what the user asked to repaint: their mask, or all it grew to
        alpha = soft_alpha(region, ~redrawn, f // 2 if feather is None else feather)
        images = [composite(target, image.resize(target.size, Image.LANCZOS), alpha) for image in images]
    return EditOutput(images, out, masked[None].expand(batch, -1, -1))
