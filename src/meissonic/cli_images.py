"""The image-making commands: `generate`, `img2img`, `inpaint`, `outpaint`.

They share one set of sampling options and one loop (load the model once, then per prompt: seeds, images, PNGs with
their parameters in the metadata). The edits only differ in what they read and which library function they call.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from .cli_common import (
    UsageError,
    add_fewer_passes_options,
    add_runtime_options,
    add_size_rule_options,
    apply_size_rule,
    check_fewer_passes_args,
    check_runtime_args,
    fewer_passes_kwargs,
    load_pipeline,
    prepare_pipeline,
    reason,
    resolve_device,
    resolve_dtype,
    version,
)


def add_image_commands(verbs) -> None:
    gen = verbs.add_parser("generate", help="make images from a prompt")
    _sampling_options(gen)
    _size_options(gen)
    _one_step_options(gen)
    gen.set_defaults(run=generate)

    i2i = verbs.add_parser("img2img", help="redraw an image under a prompt (a share of its tokens regenerated)")
    _sampling_options(i2i)
    _image_option(i2i)
    i2i.add_argument("--strength", type=float, default=0.6,
                     help="share of the image's tokens regenerated, 0..1 (0: the image as the tokenizer copies it, "
                          "1: all new; default 0.6)")
    _size_options(i2i, "the image's size, rounded to the tokenizer's patch")
    i2i.set_defaults(run=img2img_command)

    inp = verbs.add_parser("inpaint", help="repaint the masked part of an image")
    _sampling_options(inp)
    _image_option(inp)
    where = inp.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", type=Path, help="mask image of the same size, white = repaint (any image format)")
    where.add_argument("--box", help="repaint a rectangle instead: x0,y0,x1,y1 in pixels (x1, y1 excluded)")
    inp.add_argument("--grow", type=int, default=0, help="grow the mask by this many tokens (default 0)")
    _composite_options(inp)
    _size_options(inp, "the image's size, rounded to the tokenizer's patch")
    inp.set_defaults(run=inpaint_command)

    out = verbs.add_parser("outpaint", help="extend an image's canvas and draw the new area")
    _sampling_options(out)
    _image_option(out)
    for side in ("left", "right", "top", "bottom"):
        out.add_argument(f"--{side}", type=int, default=0, help=f"pixels added on the {side}")
    out.add_argument("--expand", help="instead of margins: the new canvas size WIDTHxHEIGHT, image centred")
    _composite_options(out)
    out.set_defaults(run=outpaint_command)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", type=Path, help="a UTF-8 text file with one prompt per line")
    p.add_argument("--model", default="demo", help="a model folder in the released layout, a hub repo id, or "
                   "'demo' (default): the small shapes model shipped in the package")
    p.add_argument("--negative-prompt", default="", help='what to steer away from (default "")')
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 64 for Meissonic; edits take "
                   "the share of them that matches the share of tokens they redraw)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale; <= 1 turns it off (default: the model's, 9 for Meissonic)")
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default: random)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt, sampled as one batch")
    p.add_argument("--temperature", type=float, nargs=2, default=(2.0, 0.0), metavar=("START", "END"),
                   help="Gumbel-noise temperature, annealed from START to END (default 2 0)")
    add_fewer_passes_options(p)
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="micro-condition (default 6)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default ./outputs)")
    add_runtime_options(p)
    add_size_rule_options(p)
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together (with --prompts-file)")
    p.add_argument("--release-text-encoder", action="store_true",
                   help="encode every prompt first, then free the text encoder's memory before sampling")
    p.add_argument("--lora", type=Path, help="a LoRA adapter folder written by `meissonic train --lora-rank`")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA adapter")
    p.add_argument("--allow-pickle", action="store_true", help="also load weights from pickle files (.bin/.pt/"
                   ".ckpt), read with torch.load(weights_only=True); by default only safetensors are loaded")
    p.add_argument("--ray", action="store_true", help="spread the prompts over Ray Data workers, one model each "
                   "(needs --seed; images plus metadata.jsonl in --out; a rerun skips the images already written)")
    p.add_argument("--ray-workers", type=int, default=2, help="with --ray: workers, each loading the model once")
    p.add_argument("--ray-address", help="with --ray: a Ray cluster to join (default: start a local one)")


def _size_options(p: argparse.ArgumentParser, default: str = "the model's") -> None:
    p.add_argument("--width", type=int, help=f"image width in pixels, a multiple of 16 (default: {default})")
    p.add_argument("--height", type=int, help=f"image height in pixels, a multiple of 16 (default: {default})")


def _one_step_options(p: argparse.ArgumentParser) -> None:
    """Sampling a Di[M]O one-step student (`meissonic.one_step`); defaults are the published script's."""
    from .one_step import OneStep

    d = OneStep()
    p.add_argument("--transformer", type=Path, help="a transformer folder in the released layout (e.g. a one-step "
                   "student) used instead of --model's; tokenizer, text encoder and VQ still come from --model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--one-step", action="store_true", help="sample as a one-step student: random ids with a "
                      "share masked, embedding noise, one pass without guidance (a student folder written by this "
                      "project needs no flag)")
    mode.add_argument("--multi-step", action="store_true", help="sample a student folder with the multi-step sampler")
    p.add_argument("--mask-ratio", type=float, help=f"one step: share of the random ids masked (default {d.mask_ratio})")
    p.add_argument("--embedding-noise", type=float,
                   help=f"one step: p in p * noise + sqrt(1 - p^2) * embeddings (default {d.embedding_noise})")
    p.add_argument("--sample-temperature", type=float, help=f"one step: temperature of the draw (default "
                   f"{d.temperature:g})")
    p.add_argument("--top-k", type=int, help="one step: draw among the k most likely codes (default: all)")
    p.add_argument("--top-p", type=float, help="one step: draw within this probability mass (default: all)")


ONE_STEP_OPTIONS = ("num_images_per_prompt", "micro_conditioning_aesthetic_score")  # the rest do not apply
ONE_STEP_KNOBS = {"mask_ratio": "--mask-ratio", "embedding_noise": "--embedding-noise",
                  "temperature": "--sample-temperature", "top_k": "--top-k", "top_p": "--top-p"}


def one_step_setting(args: argparse.Namespace, pipe):
    """The pipeline's `one_step=` for these options and this model: a `OneStep`, or False for multi-step."""
    from dataclasses import replace

    from .one_step import OneStep

    given = {field: getattr(args, "sample_temperature" if field == "temperature" else field, None)
             for field in ONE_STEP_KNOBS}
    given = {k: v for k, v in given.items() if v is not None}
    base = pipe.one_step_mode
    if getattr(args, "multi_step", False) or (base is None and not getattr(args, "one_step", False)):
        if given:
            flags = ", ".join(ONE_STEP_KNOBS[k] for k in given)
            raise UsageError(f"{flags}: one-step options; add --one-step (or use a student folder)")
        return False
    try:
        return replace(base or OneStep(), **given)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _image_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, required=True, help="the image to edit (any format Pillow reads)")


def _composite_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-composite", action="store_true",
                   help="keep the model's own pixels everywhere (default: paste the input's unmasked pixels back)")
    p.add_argument("--feather", type=int, help="width in pixels of the soft edge of that paste (default: half a "
                   "token)")


# ---------------------------------------------------------------------------------------------- shared loop


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts to run: the positional one and/or those of --prompts-file."""
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read prompts file {str(args.prompts_file)!r}: {reason(err)}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {str(args.prompts_file)!r} holds no prompt")
    if not prompts:
        raise UsageError("give a PROMPT or --prompts-file")
    return prompts


def check_sampling_args(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    if args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images}: must be at least 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    check_runtime_args(args)
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise UsageError(f"--guidance {args.guidance}: must be a finite number >= 0")
    check_fewer_passes_args(args)
    for name in ("width", "height"):
        value = getattr(args, name, None)
        if value is not None and (value < 16 or value % 16):
            raise UsageError(f"--{name} {value}: must be a positive multiple of 16")
    if args.seed is not None and not 0 <= args.seed < 2**63 - 2**20:
        raise UsageError(f"--seed {args.seed}: must be a non-negative integer below 2**63")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {str(args.out)!r} exists and is not a folder")


# make(pipe, prompts, generators, options) -> PIL images, every prompt once then again (num_images_per_prompt);
# options are the sampling keywords every task takes
MakeImages = Callable[..., list]


def run(args: argparse.Namespace, make: MakeImages, edit_params: dict) -> int:
    """Load the model once, then make `--num-images` images per prompt, `--batch-size` prompts at a time, and write
    them with their parameters. Under torchrun / accelerate launch each rank makes every WORLD_SIZE-th prompt; with
    `--ray`, the prompts are spread over Ray Data workers (`meissonic.ray_batch`)."""
    check_sampling_args(args)
    prompts = read_prompts(args)
    if getattr(args, "ray", False):
        from .ray_batch import generate_on_ray

        return generate_on_ray(args, partial(Maker, args, make, edit_params), prompts)
    from .runtime import process_share, rank_device

    share = process_share()
    maker = Maker(args, make, edit_params, rank_device(resolve_device(args.device), share), quiet=share.world > 1)
    jobs = share.take(list(enumerate(prompts)))  # (number in the whole list, prompt): seeds follow the number
    if args.release_text_encoder:
        maker.pipe.encode_prompts_once([p for _, p in jobs] + [args.negative_prompt], release=True)
    for start in range(0, len(jobs), args.batch_size):
        for path in maker.make_batch(jobs[start:start + args.batch_size]):
            print(f"wrote {path}")
    return 0


class Maker:
    """A loaded model and the resolved options of an image command: `make_batch` makes and writes the images of
    some (number, prompt) pairs, each image's seed following its prompt's number (so an image does not depend on
    which process or batch made it)."""

    def __init__(self, args: argparse.Namespace, make: MakeImages, edit_params: dict, device, quiet: bool = False):
        self.args, self.make, self.edit_params, self.device = args, make, edit_params, device
        self.dtype = resolve_dtype(args.dtype, device, args.model)
        pipe = load_pipeline(args.model, self.dtype, args.allow_pickle, getattr(args, "transformer", None))
        if edit_params["task"] != "text-to-image" and pipe.one_step_mode is not None:
            raise UsageError(f"model {args.model!r} is a one-step student: it only makes images from text (generate); "
                             f"edit with its teacher or another multi-step model")
        if args.lora is not None:
            pipe.load_lora(args.lora, scale=args.lora_scale)
        prepare_pipeline(pipe, device, args)
        apply_size_rule(pipe, args)
        pipe.set_progress_bar_config(disable=quiet)  # several ranks' bars would overwrite each other
        self.pipe = pipe
        self.steps = pipe.defaults["steps"] if args.steps is None else args.steps
        self.guidance = pipe.defaults["guidance"] if args.guidance is None else args.guidance
        self.seed = args.seed if args.seed is not None else random.randrange(2**31)
        options = {
            "negative_prompt": args.negative_prompt,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "num_images_per_prompt": args.num_images,
            "temperature": tuple(args.temperature),
            "micro_conditioning_aesthetic_score": args.aesthetic_score,
            **fewer_passes_kwargs(args),
        }
        one_step = one_step_setting(args, pipe) if hasattr(args, "multi_step") else False  # generate only
        if one_step:  # one pass without guidance: the multi-step options do not apply
            unused = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance),
                                               ("--speed", args.speed), ("--step-cache", args.step_cache),
                                               ("--guidance-interval", args.guidance_interval),
                                               ("--guidance-ramp", args.guidance_ramp or None),
                                               ("--draws", args.draws)) if value is not None]
            if unused:
                raise UsageError(f"{', '.join(unused)}: one-step sampling runs one pass without guidance; drop "
                                 f"{'it' if len(unused) == 1 else 'them'} (or sample with --multi-step)")
            options = {k: v for k, v in options.items() if k in ONE_STEP_OPTIONS} | {"one_step": one_step}
            self.steps, self.guidance = 1, None
        elif hasattr(args, "multi_step"):
            options["one_step"] = False
        self.options, self.one_step = options, one_step

    def make_batch(self, batch: list[tuple[int, str]], keep_existing: bool = False) -> list[Path]:
        """Make and write the images of `batch`; with `keep_existing`, an image whose file (prompt slug and seed)
        exists already is not written again (a rerun of `--ray`)."""
        import torch

        from .outputs import png_name, prompt_seeds, save_png

        args = self.args
        gen_device = "cpu" if self.device.type == "mps" else self.device
        # image order as the pipeline makes it: every prompt once, then again (num_images_per_prompt)
        seeds = {number: prompt_seeds(self.seed, number, args.num_images) for number, _ in batch}
        order = [(prompt, seeds[number][i]) for i in range(args.num_images) for number, prompt in batch]
        generators = [torch.Generator(gen_device).manual_seed(s) for _, s in order]
        images = self.make(self.pipe, [prompt for _, prompt in batch], generators, self.options)
        args.out.mkdir(parents=True, exist_ok=True)
        paths = []
        for image, (prompt, image_seed) in zip(images, order):
            existing = args.out / png_name(prompt, image_seed)
            paths.append(existing if keep_existing and existing.exists() else
                         save_png(image, args.out, prompt, image_seed, self.params(prompt, image_seed, image)))
        return paths

    def params(self, prompt: str, seed: int, image) -> dict:
        args, options, one_step = self.args, self.options, self.one_step
        return {
            "prompt": prompt,
            "negative_prompt": args.negative_prompt,
            "seed": seed,
            "steps": self.steps,
            "guidance_scale": self.guidance,
            "width": image.width,
            "height": image.height,
            "temperature": list(args.temperature),
            "speed": None if one_step else args.speed or "exact",
            "schedule": options.get("masking_schedule") or self.pipe.scheduler.config.masking_schedule,
            "guidance_interval": options.get("guidance_interval") and list(options["guidance_interval"]),
            "guidance_ramp": options.get("guidance_ramp", False),
            "order": options.get("order", "confidence"),
            "draws": options.get("draws", "reference"),
            "step_cache": None if options.get("step_cache") is None else asdict(options["step_cache"]),
            "one_step": asdict(one_step) if one_step else None,
            "aesthetic_score": args.aesthetic_score,
            "model": str(args.model),
            "lora": None if args.lora is None else str(args.lora),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": args.quantize,
            **self.edit_params,
            "meissonic_version": version(),
        }


# ---------------------------------------------------------------------------------------------- the commands


def generate(args: argparse.Namespace) -> int:
    def make(pipe, prompts, generators, options):
        return pipe(prompt=prompts, height=args.height, width=args.width, generator=generators, **options).images

    return run(args, make, {"task": "text-to-image"})


def _source(args: argparse.Namespace):
    """The --image, read and checked before any model is loaded."""
    from .edit import open_image, to_rgb

    return to_rgb(open_image(args.image))


def img2img_command(args: argparse.Namespace) -> int:
    from .edit import img2img

    if not 0 <= args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be in [0, 1]")
    image = _source(args)

    def make(pipe, prompts, generators, options):
        return img2img(pipe, prompts, image, args.strength, width=args.width, height=args.height,
                       generator=generators, **options).images

    return run(args, make, {"task": "img2img", "source_image": str(args.image), "strength": args.strength})


def inpaint_command(args: argparse.Namespace) -> int:
    from .edit import box_mask, inpaint, read_mask

    image = _source(args)
    if args.grow < 0:
        raise UsageError(f"--grow {args.grow}: must be >= 0")
    if args.box is not None:
        mask = box_mask(image.size, _ints(args.box, 4, "--box", "x0,y0,x1,y1"))
    else:
        mask = read_mask(args.mask, image.size)

    def make(pipe, prompts, generators, options):
        return inpaint(pipe, prompts, image, mask, grow=args.grow, keep_unmasked=not args.no_composite,
                       feather=args.feather, width=args.width, height=args.height, generator=generators,
                       **options).images

    where = {"mask_image": str(args.mask)} if args.box is None else {"box": args.box}
    return run(args, make, {"task": "inpaint", "source_image": str(args.image), **where, "grow": args.grow,
                            "composite": not args.no_composite, "feather": args.feather})


def outpaint_command(args: argparse.Namespace) -> int:
    from .edit import outpaint

    image = _source(args)
    margins = {side: getattr(args, side) for side in ("left", "right", "top", "bottom")}
    for side, value in margins.items():
        if value < 0:
            raise UsageError(f"--{side} {value}: must be >= 0")
    expand = None if args.expand is None else _ints(args.expand, 2, "--expand", "WIDTHxHEIGHT", sep="x")

    def make(pipe, prompts, generators, options):
        return outpaint(pipe, prompts, image, **margins, expand=expand, keep_unmasked=not args.no_composite,
                        feather=args.feather, generator=generators, **options).images

    return run(args, make, {"task": "outpaint", "source_image": str(args.image), **margins,
                            "expand": args.expand, "composite": not args.no_composite, "feather": args.feather})


def _ints(text: str, count: int, flag: str, form: str, sep: str = ",") -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split(sep))
    except ValueError:
        values = ()
    if len(values) != count:
        raise UsageError(f"{flag} {text!r}: give {form} as whole numbers")
    return values
