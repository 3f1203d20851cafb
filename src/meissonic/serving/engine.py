"""One worker thread that owns the model: a bounded queue of jobs, batched when their settings allow.

The model is loaded on the worker thread and never touched by another (the pipeline is not thread-safe, and one
long-lived thread keeps the allocator's memory in one arena, as `meissonic ui` does). Text-to-image jobs with the
same size, steps, guidance, speed and negative prompt run together as one pipeline call, up to `max_batch` images;
edits run alone. Each image has its own generator (image i of a job: seed + i), so an image does not depend on the
batch it ran in. A job is checked (`Engine.check`: limits, then `sizes.check_request`) before it is queued, so a
request that cannot run is refused at once.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

log = logging.getLogger("meissonic.serve")
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1


class JobError(ValueError):
    """A request the model cannot run as asked (a 4xx): `param` names the field at fault when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The queue holds `max_queue` jobs already (a 429); `retry_after` seconds is the estimated wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s until a place in the queue is likely")
        self.retry_after = retry_after


class NotReady(RuntimeError):
    """The model is still loading, or failed to load (a 503)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_images: int = 4  # images per request (OpenAI `n`, A1111 `batch_size * n_iter`)
    max_steps: int = 100
    max_pixels: int = 4096 * 4096  # an uploaded image or mask, decoded
    max_body_bytes: int = 32 * 1024 * 1024


@dataclass
class Job:
    """One request's work. `image` makes it an edit: with `mask` ((H, W) bool, True = redraw) an inpainting, else
    image-to-image at `strength`. Unset sizes, steps and guidance take the model's defaults (an edit: its image's
    size); an unset seed a random one."""

    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    speed: str | None = None
    image: Image.Image | None = None
    mask: np.ndarray | None = None
    strength: float | None = None
    future: Future = field(default_factory=Future, repr=False, compare=False)

    @property
    def task(self) -> str:
        return "txt2img" if self.image is None else "inpaint" if self.mask is not None else "img2img"

    def batch_key(self) -> tuple:
        """Jobs with equal keys run as one pipeline call; an edit's key is its own."""
        if self.task != "txt2img":
            return ("edit", id(self))
        return (self.width, self.height, self.steps, self.guidance, self.speed, self.negative_prompt or "")


@dataclass
class Made:
    """A job's results: the images, each image's seed and its parameters (as the CLI writes them into a PNG)."""

    images: list[Image.Image]
    seeds: list[int]
    params: list[dict]


class Engine:
    """The model's one worker: `start()` loads it (`load()` on the worker thread) and serves `submit`ted jobs."""

    def __init__(self, load: Callable[[], object], model_name: str, max_batch: int = 4, max_queue: int = 16,
                 limits: Limits = Limits(), default_speed: str | None = None, describe: dict | None = None):
        self._load = load
        self.model_name = model_name
        self.max_batch, self.max_queue, self.limits = max_batch, max_queue, limits
        self.default_speed = default_speed
        self.describe = describe or {}  # run settings recorded with every image (dtype, quantize)
        self.pipe = None
        self.error: str | None = None  # why loading failed
        self.loaded = threading.Event()  # set once loading ended, well or not
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches: list[int] = []  # images per pipeline call, for the load figures
        self.seconds_per_image = 1.0  # a running estimate, for Retry-After
        self.thread = threading.Thread(target=self._work, name="meissonic-model", daemon=True)

    # -------------------------------------------------------------------------------------- the public side

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def start(self) -> Engine:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in self.pending:
                job.future.set_exception(NotReady("the server is shutting down"))
            self.pending.clear()
            self.cond.notify_all()

    def check(self, job: Job) -> Job:
        """Fill the job's defaults and refuse what it may not ask (JobError), before it takes a place in the queue."""
        from ..sizes import SizeError, check_request
        from ..speeds import LEVELS, SPEEDS

        pipe = self._pipe()
        limits = self.limits
        if not isinstance(job.prompt, str):
            raise JobError("prompt must be a string", "prompt")
        if len(job.prompt) > MAX_PROMPT_CHARS:
            raise JobError(f"prompt has {len(job.prompt)} characters: at most {MAX_PROMPT_CHARS}", "prompt")
        if not 1 <= job.n <= limits.max_images:
            raise JobError(f"n={job.n}: this server makes 1 to {limits.max_images} images per request", "n")
        job.speed = job.speed or self.default_speed
        if job.speed is not None and job.speed not in SPEEDS:
            raise JobError(f"speed={job.speed!r} is not one of {', '.join(SPEEDS)}", "speed")
        job.steps = pipe.defaults["steps"] if job.steps is None else job.steps
        if not 1 <= job.steps <= limits.max_steps:
            raise JobError(f"steps={job.steps}: must lie in 1..{limits.max_steps}", "steps")
        job.guidance = float(pipe.defaults["guidance"] if job.guidance is None else job.guidance)
        if not math.isfinite(job.guidance) or not 0 <= job.guidance <= 100:
            raise JobError(f"guidance_scale={job.guidance}: must be a number in [0, 100] (<= 1: no guidance)",
                           "guidance_scale")
        if job.seed is None or job.seed < 0:
            job.seed = random.randrange(2**31)
        if job.seed + job.n > MAX_SEED:
            raise JobError(f"seed={job.seed}: must be below 2**63 - n", "seed")
        if job.image is not None:
            self._check_edit(pipe, job)
        else:
            job.width = pipe.defaults["resolution"] if job.width is None else job.width
            job.height = pipe.defaults["resolution"] if job.height is None else job.height
        try:
            pipe.check_size(job.height, job.width)
            cached = LEVELS.get(job.speed or "exact", {}).get("step_cache") is not None
            check_request(pipe, job.width, job.height, job.n, guided=job.guidance > 1, cached=cached, warn=False)
        except SizeError as err:
            raise JobError(str(err), "size") from None
        except ValueError as err:
            raise JobError(f"size {job.width}x{job.height}: {err}", "size") from None
        return job

    def submit(self, job: Job) -> Future:
        """Queue a checked job; its future gets a `Made`, or the error (JobError for a 4xx)."""
        with self.cond:
            if self.closed:
                raise NotReady("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one batch."""
        return max(1, math.ceil(self.seconds_per_image * self.max_batch))

    # -------------------------------------------------------------------------------------- the worker

    def _pipe(self):
        if self.pipe is None:
            raise NotReady(f"the model failed to load: {self.error}" if self.error else "the model is loading")
        return self.pipe

    def _check_edit(self, pipe, job: Job) -> None:
        from ..edit import fit_size

        if job.image.width * job.image.height > self.limits.max_pixels:
            raise JobError(f"image of {job.image.width}x{job.image.height} pixels: at most {self.limits.max_pixels} "
                           f"pixels", "image")
        if job.mask is not None:
            if job.mask.shape != (job.image.height, job.image.width):
                raise JobError(f"mask of {job.mask.shape[1]}x{job.mask.shape[0]} for an image of "
                               f"{job.image.width}x{job.image.height}: they must have the same size", "mask")
            if not job.mask.any():
                raise JobError("the mask marks nothing to edit", "mask")
        elif job.strength is None or not 0 < job.strength <= 1:
            raise JobError(f"strength={job.strength}: must lie in (0, 1]", "strength")
        if job.width is None or job.height is None:
            job.width, job.height = fit_size(pipe, job.image.width, job.image.height)

    def _work(self) -> None:
        try:
            self.pipe = self._load()
        except Exception as err:  # noqa: BLE001 - reported by /ready and the requests, never raised into a thread
            self.error = f"{type(err).__name__}: {err}".splitlines()[0]
            log.error("meissonic serve: the model failed to load: %s", self.error)
            return
        finally:
            self.loaded.set()
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch = self._take()
            self._run(batch)

    def _take(self) -> list[Job]:
        """The oldest job and the queued ones that can share its pipeline call, up to `max_batch` images."""
        first = self.pending.popleft()
        batch, images, key = [first], first.n, first.batch_key()
        for job in list(self.pending):
            if job.batch_key() == key and images + job.n <= self.max_batch:
                self.pending.remove(job)
                batch.append(job)
                images += job.n
        return batch

    def _run(self, batch: list[Job]) -> None:
        from ..edit import EditError
        from ..sizes import SizeError

        started = time.perf_counter()
        try:
            made = self._generate(batch)
        except (JobError, EditError, SizeError) as err:
            for job in batch:
                job.future.set_exception(JobError(str(err)))
            return
        except Exception as err:  # noqa: BLE001 - the request gets a 500 without the traceback; the log keeps it
            log.exception("meissonic serve: a generation failed")
            for job in batch:
                job.future.set_exception(err)
            return
        images = sum(job.n for job in batch)
        self.batches.append(images)
        self.seconds_per_image = 0.5 * self.seconds_per_image + 0.5 * (time.perf_counter() - started) / images
        for job, result in zip(batch, made):
            job.future.set_result(result)

    def _generate(self, batch: list[Job]) -> list[Made]:
        import torch

        from ..edit import img2img, inpaint

        pipe = self.pipe
        first = batch[0]
        device = pipe._execution_device
        gen_device = "cpu" if device.type == "mps" else device
        seeds = [job.seed + i for job in batch for i in range(job.n)]
        generators = [torch.Generator(gen_device).manual_seed(s) for s in seeds]
        common = dict(num_inference_steps=first.steps, guidance_scale=first.guidance,
                      negative_prompt=first.negative_prompt, speed=first.speed)
        if first.task == "txt2img":
            prompts = [job.prompt for job in batch for _ in range(job.n)]
            images = pipe(prompt=prompts, height=first.height, width=first.width, generator=generators,
                          **common).images
        elif first.task == "inpaint":
            images = inpaint(pipe, first.prompt, first.image, first.mask, width=first.width, height=first.height,
                             num_images_per_prompt=first.n, generator=generators, **common).images
        else:
            images = img2img(pipe, first.prompt, first.image, first.strength, width=first.width,
                             height=first.height, num_images_per_prompt=first.n, generator=generators,
                             **common).images
        made, start = [], 0
        for job in batch:
            mine = images[start:start + job.n]
            made.append(Made(mine, seeds[start:start + job.n], [self._params(job, s, im) for s, im in
                                                               zip(seeds[start:start + job.n], mine)]))
            start += job.n
        return made

    def _params(self, job: Job, seed: int, image: Image.Image) -> dict:
        """An image's parameters, with the keys the CLI writes into its PNGs."""
        from ..version import __version__

        params = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": seed,
                  "steps": job.steps, "guidance_scale": job.guidance, "width": image.width, "height": image.height,
                  "speed": job.speed or "exact", "task": job.task, "model": self.model_name, **self.describe}
        if job.task == "img2img":
            params["strength"] = job.strength
        params["meissonic_version"] = __version__
        return params
