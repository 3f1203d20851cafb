"""The AUTOMATIC1111 API: `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`, `GET /sdapi/v1/sd-models`,
`GET`/`POST /sdapi/v1/options`.

Fields as AUTOMATIC1111 names them: `cfg_scale` is the guidance scale, `batch_size * n_iter` the number of images,
`seed` -1 a random one (image i gets seed + i, as `all_seeds` says); unset `steps`, `cfg_scale`, `width` and
`height` take the model's defaults. img2img: the first of `init_images` (base64, a `data:` prefix tolerated); with
a `mask` (white = redraw; `inpainting_mask_invert` = 1 flips it) an inpainting, else image-to-image at
`denoising_strength`. The sampler is always Meissonic's (`sampler_name` is ignored); an extra `speed` field picks
the speed level. Unknown fields are accepted, as the original does.
"""

from __future__ import annotations

import json

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from .common import decode_base64_image, encode_image, run_job, white_mask
from .engine import Engine, Job, JobError

SAMPLER = "MaskGIT"


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    speed: str | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str]
    mask: str | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0


def _job(body: Txt2ImgBody, engine: Engine, **edit) -> Job:
    if body.batch_size < 1 or body.n_iter < 1:
        raise JobError(f"batch_size={body.batch_size} and n_iter={body.n_iter} must be at least 1", "batch_size")
    return Job(prompt=body.prompt, n=body.batch_size * body.n_iter, width=body.width, height=body.height,
               steps=body.steps, guidance=body.cfg_scale, negative_prompt=body.negative_prompt or None,
               seed=None if body.seed < 0 else body.seed, speed=body.speed, **edit)


def _respond(made, job: Job, body: BaseModel, engine: Engine) -> dict:
    def infotext(seed: int) -> str:
        negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
        return (f"{job.prompt}{negative}\nSteps: {job.steps}, Sampler: {SAMPLER}, CFG scale: {job.guidance:g}, "
                f"Seed: {seed}, Size: {job.width}x{job.height}, Model: {engine.model_name}, "
                f"Speed: {job.speed or 'exact'}")

    info = {"prompt": job.prompt, "all_prompts": [job.prompt] * job.n, "negative_prompt": job.negative_prompt or "",
            "all_negative_prompts": [job.negative_prompt or ""] * job.n, "seed": made.seeds[0],
            "all_seeds": made.seeds, "subseed": -1, "all_subseeds": [-1] * job.n, "width": job.width,
            "height": job.height, "steps": job.steps, "cfg_scale": job.guidance, "sampler_name": SAMPLER,
            "batch_size": job.n, "sd_model_name": engine.model_name, "infotexts": [infotext(s) for s in made.seeds]}
    images = [encode_image(image, params) for image, params in zip(made.images, made.params)]
    parameters = body.model_dump()
    parameters.pop("init_images", None)  # not echoed back: they can be megabytes
    parameters.pop("mask", None)
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def router(engine: Engine) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")

    def model_entry() -> dict:
        return {"title": engine.model_name, "model_name": engine.model_name, "hash": None, "sha256": None,
                "filename": engine.model_name, "config": None}

    @api.get("/sd-models")
    async def sd_models():
        return [model_entry()]

    @api.get("/options")
    async def get_options():
        return {"sd_model_checkpoint": engine.model_name, "samples_format": "png"}

    @api.post("/options")
    async def set_options(options: dict):
        wanted = options.get("sd_model_checkpoint")
        if wanted is not None and wanted != engine.model_name:
            raise JobError(f"sd_model_checkpoint={wanted!r}: this server serves one model, {engine.model_name!r}",
                           "sd_model_checkpoint")
        return None

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgBody):
        job = _job(body, engine)
        return _respond(await run_job(engine, job), job, body, engine)

    @api.post("/img2img")
    async def img2img(body: Img2ImgBody):
        if not body.init_images:
            raise JobError("init_images must hold one base64 image", "init_images")
        limit = engine.limits.max_pixels
        image = decode_base64_image(body.init_images[0], "init_images", limit).convert("RGB")
        mask = None
        if body.mask:
            mask = white_mask(decode_base64_image(body.mask, "mask", limit))
            if body.inpainting_mask_invert:
                mask = ~mask
        job = _job(body, engine, image=image, mask=mask,
                   strength=None if mask is not None else body.denoising_strength)
        return _respond(await run_job(engine, job), job, body, engine)

    return api
