"""The OpenAI Images API: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

Request fields as OpenAI defines them, mapped onto Meissonic (README, "Serving"): `size` "WxH" or "auto" (the
model's resolution); `quality` picks the speed level (low: fastest, medium: fast, high/hd: exact; standard/auto: the
server's); `response_format` b64_json by default, `url` gives a `data:` URL (this server keeps no files to link to);
`output_format` png (with the parameters in its metadata, as the CLI writes), jpeg or webp; `style`, `background`
(always opaque), `moderation` and `user` are accepted and ignored; `model` may name anything (clients hard-code
names), the one served model answers. Extra top-level fields: `seed`, `steps` (or `num_inference_steps`),
`guidance_scale`, `negative_prompt`, `speed`, and on edits `strength`.
Edits take `image` or `image[]` (the first image is edited) and an optional `mask` whose fully transparent pixels
mark the area to edit; without a mask the whole image is redrawn (image-to-image at strength 1, or at the extra
field `strength` when given).
"""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from .common import encode_image, open_upload, run_job, transparent_mask
from .engine import Engine, Job, JobError

QUALITY_SPEEDS = {"low": "fastest", "medium": "fast", "high": "exact", "hd": "exact", "standard": None, "auto": None}
SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")


class GenerationBody(BaseModel):
    """`POST /v1/images/generations`; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: str | None = None
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    stream: bool | None = None
    seed: int | None = None
    steps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    speed: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = SIZE.match(size) if isinstance(size, str) else None
    if not match:
        raise JobError(f"size={size!r} must be 'auto' or 'WIDTHxHEIGHT' (e.g. '1024x1024')", "size")
    return int(match[1]), int(match[2])


def speed_of(quality: str | None, speed: str | None) -> str | None:
    if speed is not None:
        return speed
    if quality is not None and quality not in QUALITY_SPEEDS:
        raise JobError(f"quality={quality!r} is not one of {', '.join(QUALITY_SPEEDS)}", "quality")
    return QUALITY_SPEEDS.get(quality)


def respond(made, job: Job, response_format: str | None, output_format: str | None, compression: int | None,
            quality: str | None) -> dict:
    fmt = output_format or "png"
    data = []
    for image, params in zip(made.images, made.params):
        encoded = encode_image(image, params, fmt, compression)
        entry = {"url": f"data:image/{fmt};base64,{encoded}"} if response_format == "url" else {"b64_json": encoded}
        data.append({**entry, "revised_prompt": job.prompt})
    return {"created": int(time.time()), "data": data, "size": f"{job.width}x{job.height}", "output_format": fmt,
            "quality": quality or "auto", "background": "opaque"}


def router(engine: Engine) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "meissonic"}]}

    @api.post("/images/generations")
    async def generations(body: GenerationBody):
        if body.stream:
            raise JobError("stream=true is not supported: images come whole in one response", "stream")
        width, height = parse_size(body.size)
        job = Job(prompt=body.prompt, n=1 if body.n is None else body.n, width=width, height=height,
                  steps=body.steps if body.steps is not None else body.num_inference_steps,
                  guidance=body.guidance_scale, negative_prompt=body.negative_prompt, seed=body.seed,
                  speed=speed_of(body.quality, body.speed))
        made = await run_job(engine, job)
        return respond(made, job, body.response_format, body.output_format, body.output_compression, body.quality)

    @api.post("/images/edits")
    async def edits(request: Request):
        form = await request.form(max_files=16, max_fields=64)
        fields = {key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)}
        images = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
        if not images:
            raise JobError("an image is required: send it as the multipart file 'image' (or 'image[]')", "image")
        limit = engine.limits.max_pixels
        image = open_upload(await images[0].read(), "image", limit)
        mask = form.get("mask")
        mask = transparent_mask(open_upload(await mask.read(), "mask", limit)) if isinstance(mask, UploadFile) else None
        prompt = fields.get("prompt")
        if not prompt:
            raise JobError("prompt is required", "prompt")
        width, height = parse_size(fields.get("size"))
        strength = _number(fields, "strength", float)
        if mask is None and strength is None:
            strength = 1.0  # no mask: the whole image is redrawn (inpainting refuses a mask that keeps nothing)
        response_format = fields.get("response_format")
        if response_format not in (None, "url", "b64_json"):
            raise JobError(f"response_format={response_format!r} is not one of url, b64_json", "response_format")
        output_format = fields.get("output_format")
        if output_format not in (None, "png", "jpeg", "webp"):
            raise JobError(f"output_format={output_format!r} is not one of png, jpeg, webp", "output_format")
        steps = _number(fields, "steps", int)
        n = _number(fields, "n", int)
        job = Job(prompt=prompt, n=1 if n is None else n, width=width, height=height,
                  steps=steps if steps is not None else _number(fields, "num_inference_steps", int),
                  guidance=_number(fields, "guidance_scale", float), negative_prompt=fields.get("negative_prompt"),
                  seed=_number(fields, "seed", int), speed=speed_of(fields.get("quality"), fields.get("speed")),
                  image=image.convert("RGB"), mask=mask, strength=strength)
        made = await run_job(engine, job)
        return respond(made, job, response_format, output_format, _number(fields, "output_compression", int),
                       fields.get("quality"))

    return api


def _number(fields: dict, name: str, kind: type):
    value = fields.get(name)
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise JobError(f"{name}={value!r} must be a{'n integer' if kind is int else ' number'}", name) from None
