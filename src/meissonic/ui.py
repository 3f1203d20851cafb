"""`meissonic ui`: one Gradio app for every task (text to image, image to image, inpaint, outpaint).

A thin shell over the library: generation is `MeissonicPipeline.__call__`, edits are `meissonic.edit`'s functions,
loading is `load_pipeline` as for the CLI. The model is loaded once. Offline: gradio's analytics and version check are
off and the page loads no outside assets. A queue with a concurrency limit and a maximum size guards the model; a
request beyond it is told the queue is full.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .one_step import ONE_STEP  # noqa: E402
from .sizes import SizeError, SizePolicy  # noqa: E402
from .speeds import SPEEDS  # noqa: E402
from .vq import decode_tokens  # noqa: E402

TASKS = ("Text to image", "Image to image", "Inpaint", "Outpaint")
SHAPES_EXAMPLES = [
    "a large red circle on the left",
    "a small blue triangle above a yellow square, on a white background",
    "a large green square in the center, on a black background",
    "a small purple star on the right",
]
GENERAL_EXAMPLES = [
    "a photo of a red fox in the snow",
    "a lighthouse at dusk, oil painting",
    "a bowl of ramen, studio lighting",
]


@dataclass
class Settings:
    """The advanced settings every tab shares."""

    negative_prompt: str = ""
    seed: int = 0
    randomize: bool = True
    width: int = 256
    height: int = 256
    guidance: float = 9.0
    steps: int = 12
    temperature: float = 2.0
    schedule: str = "cosine"
    num_images: int = 1
    preview_every: int = 0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # shares of the steps that are guided: [start, end)
    guidance_ramp: bool = False
    order: str = "confidence"
    speed: str = "exact"  # a level of `meissonic.speeds`, with "exact" the knobs above alone; or ONE_STEP


class UserError(ValueError):
    """Bad input from the page (no prompt, no image, no mask): shown as a message, never a crash."""


def mask_from_editor(value: dict | None) -> tuple[Image.Image, np.ndarray]:
    """A gradio ImageEditor value -> (the uploaded image, the painted mask (H, W) bool): any stroke on any layer."""
    if not value or value.get("background") is None:
        raise UserError("Upload an image first.")
    background = value["background"]
    mask = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is not None:
            alpha = np.asarray(layer.convert("RGBA"))[..., 3]
            if alpha.shape == mask.shape:
                mask |= alpha > 0
    if not mask.any():
        raise UserError("Paint over the part to repaint with the brush first.")
    return background, mask


def preview_image(pipe, tokens: torch.Tensor) -> Image.Image:
    """A partly decoded grid (1, h, w): known tokens decoded, still-masked ones shown grey."""
    mask_id = pipe.scheduler.config.mask_token_id
    unknown = tokens == mask_id
    pixels = decode_tokens(pipe.vqvae, torch.where(unknown, 0, tokens))[0]  # (3, H, W)
    f = pipe.vae_scale_factor
    grey = unknown[0].repeat_interleave(f, 0).repeat_interleave(f, 1).to(pixels.device)  # (H, W)
    pixels = torch.where(grey, torch.full_like(pixels, 0.5), pixels)
    return Image.fromarray((pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


class Studio:
    """The loaded model (and a one-step student of it, when given) and the one function every tab calls."""

    def __init__(self, pipe, model_name: str, student=None):
        self.pipe = pipe
        self.model_name = model_name
        # a model that is itself a student samples in one step only; a teacher with a student offers both
        self.student = pipe if pipe.one_step_mode is not None else student
        if self.student is pipe:
            self.speeds = [ONE_STEP]
        else:
            self.speeds = list(SPEEDS) + ([ONE_STEP] if student is not None else [])
        # the size rule as the command line applies it (the sliders stop at the size limit; outpaint margins do not)
        for model in {id(pipe): pipe, id(self.student): self.student}.values():
            if model is not None:
                model.size_policy = SizePolicy(allow_large=False, check_memory=True)
        self.lock = threading.Lock()  # one generation at a time on this model, whatever the queue allows
        # every request's work runs on this one long-lived thread: a thread per request would spread the model's
        # working memory over the allocator's per-thread arenas, and the server's memory would creep up with load
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meissonic-model")

    def make(self, task: str, prompt: str, image, editor, strength: float, margins: tuple[int, int, int, int],
             settings: Settings, on_step=None) -> tuple[list[Image.Image], int]:
        """Run one task; returns the images and the seed used. `on_step(step, total, tokens)` follows sampling."""
        from .edit import EditError, img2img, inpaint, outpaint

        if not prompt or not prompt.strip():
            raise UserError("Enter a prompt.")
        if task in ("Image to image", "Outpaint") and image is None:
            raise UserError("Upload an image first.")
        seed = random.randrange(2**31) if settings.randomize else int(settings.seed)
        generators = [torch.Generator(self.pipe._execution_device).manual_seed(seed + i)
                      for i in range(settings.num_images)]

        def callback(pipe, step, timestep, names):  # timestep counts the steps left: the total is step + it + 1
            if on_step is not None:
                on_step(step, step + timestep + 1, names["latents"])
            return {}

        if settings.speed not in self.speeds:
            raise UserError(f"Speed {settings.speed!r} is not available here: choose {', '.join(self.speeds)}.")
        if settings.speed == ONE_STEP:
            if task != "Text to image":
                raise UserError("One step makes new images from text only: pick exact, fast or fastest to edit.")
            try:
                with self.lock:
                    images = self.student(prompt=prompt, height=settings.height, width=settings.width,
                                          num_images_per_prompt=settings.num_images, generator=generators,
                                          callback_on_step_end=callback, one_step=True).images
            except SizeError as err:
                raise UserError(str(err)) from None
            return images, seed
        options = dict(negative_prompt=settings.negative_prompt, guidance_scale=settings.guidance,
                       num_inference_steps=settings.steps, num_images_per_prompt=settings.num_images,
                       temperature=(settings.temperature, 0.0),
                       masking_schedule=None if settings.schedule == self.pipe.scheduler.config.masking_schedule
                       else settings.schedule,
                       guidance_interval=None if settings.guidance_interval == (0, 1) else settings.guidance_interval,
                       guidance_ramp=settings.guidance_ramp, order=settings.order,
                       speed=None if settings.speed == "exact" else settings.speed,
                       generator=generators, callback_on_step_end=callback)
        try:
            with self.lock:
                if task == "Text to image":
                    images = self.pipe(prompt=prompt, height=settings.height, width=settings.width, **options).images
                elif task == "Image to image":
                    images = img2img(self.pipe, prompt, image, strength, **options).images
                elif task == "Inpaint":
                    source, mask = mask_from_editor(editor)
                    images = inpaint(self.pipe, prompt, source, mask, **options).images
                else:
                    left, right, top, bottom = (int(m) for m in margins)
                    images = outpaint(self.pipe, prompt, image, left=left, right=right, top=top, bottom=bottom,
                                      **options).images
        except (EditError, SizeError) as err:
            raise UserError(str(err)) from None
        return images, seed


def build_app(studio: Studio, max_queue: int = 16, concurrency: int = 1):
    """The Blocks app: four tabs, shared advanced settings, a gallery, the seed and time taken."""
    pipe = studio.pipe
    f, side, default = pipe.vae_scale_factor, pipe.max_side, pipe.defaults["resolution"]
    examples = SHAPES_EXAMPLES if studio.model_name in ("demo", "demo-1step") else GENERAL_EXAMPLES

    # uploads and results older than an hour are deleted every hour (and all of them when the server stops)
    with gr.Blocks(title="Meissonic", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        student = "" if studio.student is None or studio.student is pipe else " · one-step student loaded"
        steps_said = "one step" if studio.student is pipe else f"{pipe.defaults['steps']} steps"
        gr.Markdown(f"## Meissonic\nModel: `{studio.model_name}` ({default} px, {steps_said}){student}")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab(TASKS[0], id=0):
                        t2i_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="t2i-prompt")
                        t2i_go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                        gr.Examples(examples, inputs=[t2i_prompt], label="Examples")
                    with gr.Tab(TASKS[1], id=1):
                        i2i_image = gr.Image(label="Image", type="pil", image_mode="RGB", elem_id="i2i-image")
                        i2i_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="i2i-prompt")
                        strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Strength (share of tokens redrawn)")
                        i2i_go = gr.Button("Generate", variant="primary", elem_id="i2i-generate")
                    with gr.Tab(TASKS[2], id=2):
                        editor = gr.ImageEditor(label="Image: paint over what to repaint", type="pil",
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                transforms=(), layers=False, elem_id="inpaint-editor")
                        inp_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="inpaint-prompt")
                        inp_go = gr.Button("Generate", variant="primary", elem_id="inpaint-generate")
                    with gr.Tab(TASKS[3], id=3):
                        out_image = gr.Image(label="Image", type="pil", image_mode="RGB", elem_id="outpaint-image")
                        out_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="outpaint-prompt")
                        with gr.Row():
                            margins = [gr.Slider(0, side, value=f * (4 if name == "Right" else 0), step=f,
                                                 label=f"{name} (pixels)") for name in ("Left", "Right", "Top",
                                                                                        "Bottom")]
                        out_go = gr.Button("Generate", variant="primary", elem_id="outpaint-generate")
                with gr.Accordion("Advanced settings", open=False):
                    negative = gr.Textbox(value="", label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        randomize = gr.Checkbox(value=True, label="Randomise seed")
                    with gr.Row():
                        width = gr.Slider(f, side, value=default, step=f, label="Width (text to image)")
                        height = gr.Slider(f, side, value=default, step=f, label="Height (text to image)")
                    guidance = gr.Slider(0, 20, value=pipe.defaults["guidance"], step=0.5, label="Guidance")
                    steps = gr.Slider(1, 100, value=pipe.defaults["steps"], step=1, label="Steps")
                    temperature = gr.Slider(0, 5, value=2.0, step=0.1, label="Temperature (start; annealed to 0)")
                    speed = gr.Radio(studio.speeds, value=studio.speeds[0], label="Speed (fast, fastest: fewer and "
                                     "partial passes, measured in the README; the options below replace a level's; "
                                     "one-step: the student, text to image only)", elem_id="speed")
                    schedule = gr.Radio(["cosine", "linear", "arccos"], value=pipe.scheduler.config.masking_schedule,
                                        label="Mask schedule")
                    with gr.Row():
                        guide_from = gr.Slider(0, 1, value=0, step=0.05, label="Guide from (share of the steps)")
                        guide_to = gr.Slider(0, 1, value=1, step=0.05, label="Guide until (share of the steps)")
                    with gr.Row():
                        ramp = gr.Checkbox(value=False, label="Ramp guidance with the share of known tokens")
                        order = gr.Radio(["confidence", "halton"], value="confidence", label="Unmasking order")
                    num_images = gr.Slider(1, 8, value=1, step=1, label="Number of images")
                    preview_every = gr.Slider(0, 16, value=0, step=1, label="Live preview every N steps (0: off)")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery", format="png")
                info = gr.Markdown(elem_id="info")

        def run(task_name, prompt, i2i_img, editor_value, strength_value, out_img, left, right, top, bottom,
                negative_prompt, seed_value, randomize_seed, w, h, g, n_steps, temp, sched, n_images, every,
                g_from, g_to, g_ramp, unmask_order, speed_level, progress=gr.Progress()):
            settings = Settings(negative_prompt or "", int(seed_value or 0), bool(randomize_seed), int(w), int(h),
                                float(g), int(n_steps), float(temp), sched, int(n_images), int(every),
                                (float(g_from), float(g_to)), bool(g_ramp), unmask_order, speed_level or "exact")
            image = i2i_img if task_name == TASKS[1] else out_img
            events: queue.Queue = queue.Queue()

            def on_step(step, total, tokens):
                progress((step + 1, total), desc="sampling", unit="steps")
                if settings.preview_every and (step + 1) % settings.preview_every == 0:
                    events.put(("preview", preview_image(pipe, tokens[:1])))

            def work():
                began = time.perf_counter()
                try:
                    images, used = studio.make(task_name, prompt, image, editor_value, float(strength_value),
                                               (left, right, top, bottom), settings, on_step)
                    events.put(("done", (images, used, time.perf_counter() - began)))
                except Exception as err:  # reported in the page, the server goes on
                    events.put(("error", err))

            studio.worker.submit(work)
            while True:
                kind, payload = events.get()
                if kind == "preview":
                    yield [payload], "Sampling..."
                elif kind == "error":
                    if isinstance(payload, (UserError, ValueError)):
                        raise gr.Error(str(payload))
                    raise gr.Error(f"Generation failed: {type(payload).__name__}: {payload}")
                else:
                    images, used, took = payload
                    ran = studio.student if settings.speed == ONE_STEP else pipe
                    passes = ran.last_work.get("passes")
                    work = f" · {passes:.1f} transformer passes an image" if passes else ""
                    yield images, (f"Seed **{used}** · {len(images)} image(s) in **{took:.1f} s** · {task_name}"
                                   f"{work}")
                    return

        shared = [negative, seed, randomize, width, height, guidance, steps, temperature, schedule, num_images,
                  preview_every, guide_from, guide_to, ramp, order, speed]
        for button, name, prompt_box in ((t2i_go, TASKS[0], t2i_prompt), (i2i_go, TASKS[1], i2i_prompt),
                                         (inp_go, TASKS[2], inp_prompt), (out_go, TASKS[3], out_prompt)):
            inputs = [gr.State(name), prompt_box, i2i_image, editor, strength, out_image, *margins, *shared]
            api = name.lower().replace(" ", "_")  # text_to_image, image_to_image, inpaint, outpaint
            button.click(run, inputs=inputs, outputs=[gallery, info], concurrency_limit=concurrency,
                         concurrency_id="model", api_name=api)
            prompt_box.submit(run, inputs=inputs, outputs=[gallery, info], concurrency_limit=concurrency,
                              concurrency_id="model", api_visibility="private")
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    return app


def launch(model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False, max_queue: int = 16,
           concurrency: int = 1, dtype=None, device=None, block: bool = True, max_file_size: str = "20mb",
           allow_pickle: bool = False, options=None, student: str | None = None):
    """Load the model once and serve the app; returns (app, local URL). `options`: a `runtime.RunOptions`
    (quantization, offload, compile, tiled decoding). `student`: a one-step student of `model` (a folder or
    "demo-1step"), offered as the speed "one-step"; it shares the model's tokenizer, text encoder and VQ."""
    from .cli_common import load_pipeline, load_student
    from .runtime import RunOptions, prepare

    options = options or RunOptions()
    pipe = load_pipeline(model, dtype, allow_pickle)
    device = device if device is not None else pipe.device
    prepare(pipe, device, options)
    pipe.set_progress_bar_config(disable=True)
    one_step = None
    if student is not None:
        one_step = load_student(pipe, student, dtype, allow_pickle)
        prepare(one_step, device, replace(options, quantize_text_encoder=False))  # the shared encoder is done
        one_step.set_progress_bar_config(disable=True)
    app = build_app(Studio(pipe, model, one_step), max_queue=max_queue, concurrency=concurrency)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                           quiet=True, max_file_size=max_file_size, footer_links=[])
    return app, url
