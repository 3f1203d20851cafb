"""The `meissonic` command: a thin shell over the library.

  meissonic generate PROMPT [--model DIR_OR_REPO (default: the shipped demo)] [--steps --guidance --seed ...]
  meissonic img2img | inpaint | outpaint PROMPT --image PATH [...]   (image editing, see `cli_images.py`)
  meissonic train | distill | train-vq | data shapes | eval shapes | bench | convert | init

Bad input exits with status 2 and one line on stderr naming the problem; no file that exists is ever overwritten.
"""

from __future__ import annotations

import argparse
from functools import partial
import json
import os
import sys
from pathlib import Path

from .cli_common import (
    OFFLOADS,
    QUANTIZE,
    UsageError,
    add_fewer_passes_options,
    add_runtime_options,
    add_size_rule_options,
    apply_size_rule,
    check_fewer_passes_args,
    check_runtime_args,
    check_vq_tile,
    fewer_passes_kwargs,
    load_pipeline,
    prepare_pipeline,
    reason,
    run_options,
    resolve_device,
    resolve_dtype,
    save_new_folder,
    show_size_warnings,
    torch_dtype,
    version,
)
from .cli_images import add_image_commands
from .speeds import SPEEDS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_libraries()
        show_size_warnings()
        return args.run(args) or 0
    except (UsageError, ValueError, OSError) as err:
        print(f"meissonic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meissonic: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meissonic", description="Meissonic text-to-image (arXiv 2410.08261)")
    parser.add_argument("--version", action="version", version=f"meissonic {version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    add_image_commands(verbs)

    bench = verbs.add_parser("bench", help="time and size whole generations per precision and quantization")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model folder or hub repo id (default: --preset meissonic)")
    source.add_argument("--preset", help=f"an architecture with random weights (no download): {', '.join(_preset_names())}")
    bench.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    bench.add_argument("--steps", type=int, help="sampling steps (default: the model's, 64 for Meissonic)")
    bench.add_argument("--batch", type=int, default=1, help="images per generation (default 1)")
    bench.add_argument("--guidance", type=float, help="guidance scale; <= 1 runs no unconditional batch "
                       "(default: the model's)")
    bench.add_argument("--dtypes", default="fp32,bf16", help="comma-separated precisions: fp32, bf16, fp16 (GPU)")
    bench.add_argument("--quantize", default="none", help="comma-separated: none, int8, fp8, int4; one row per "
                       "precision and method")
    bench.add_argument("--release-text-encoder", action="store_true", help="free the text encoder before sampling")
    bench.add_argument("--vq-tile", type=int, help="decode in tiles of this many tokens a side")
    bench.add_argument("--offload", default="none", choices=OFFLOADS, help="GPU only: model or sequential offload")
    bench.add_argument("--compile", action="store_true", help="torch.compile the transformer (one graph per size)")
    bench.add_argument("--speeds", default="exact", help="comma-separated speed levels (exact, fast, fastest): one "
                       "row per level with its transformer compute (full-pass equivalents) and time, and the share "
                       "of tokens drawn as exact drew them")
    bench.add_argument("--speed", dest="speeds", help="one speed level (same as --speeds with one)")
    bench.add_argument("--student", help="a one-step student of --model (a folder, or demo-1step): one more row per "
                       "precision and quantization, sampled in one pass, its time against the exact row's")
    bench.add_argument("--no-agreement", action="store_true",
                       help="skip the fp32 reference run that the top-1 token agreement is measured against")
    bench.add_argument("--repeat", type=int, default=1, help="run the rows this many rounds, interleaved; times "
                       "are medians and the step speed-up the median (and range) of the per-round ratios")
    bench.add_argument("--warmup", action="store_true", help="run one untimed generation in each row's process "
                       "first: the times are then a warm process's (without: the first generation's, one-time setup "
                       "included)")
    bench.add_argument("--iterations", type=int, default=1, help="time this many generations in each row's "
                       "process (after --warmup's) and report each time as their median: steadier figures for rows "
                       "of milliseconds, such as a one-step student's")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--json", type=Path, help="also write the rows to this JSON file (must not exist)")
    bench.set_defaults(run=bench_command)

    tr = verbs.add_parser("train", help="train or fine-tune the transformer (full or LoRA)")
    tr.add_argument("--data", required=True, help="parquet file/folder/glob, image folder with .txt captions, "
                    "or a datasets save_to_disk folder")
    tr.add_argument("--out", type=Path, required=True, help="output folder: checkpoints, metrics, final model")
    tr.add_argument("--model", help="pipeline folder to fine-tune (or whose tokenizer/text encoder to reuse)")
    tr.add_argument("--preset", help=f"train a new transformer of this architecture: {', '.join(_preset_names())}")
    tr.add_argument("--vqvae", help="a tokenizer folder (e.g. `meissonic train-vq` output) to use instead")
    tr.add_argument("--image-column", default="image")
    tr.add_argument("--caption-column", default="caption")
    tr.add_argument("--score-column", default="aesthetic_score", help="aesthetic score column, used when present")
    tr.add_argument("--resolution", type=int, default=256)
    tr.add_argument("--center-crop", action="store_true", help="center instead of random crops")
    tr.add_argument("--batch-size", type=int, default=4, help="per process")
    tr.add_argument("--gradient-accumulation", type=int, default=1)
    tr.add_argument("--max-steps", type=int, default=1000)
    tr.add_argument("--learning-rate", type=float, default=1e-4)
    tr.add_argument("--lr-scheduler", default="constant",
                    choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"))
    tr.add_argument("--warmup-steps", type=int, default=0)
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit")
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    tr.add_argument("--min-mask-rate", type=float, default=0.0)
    tr.add_argument("--mask-rate-power", type=float, default=1.0,
                    help="mask ratio cos(pi/2 u^p): 1 = the paper; > 1 trains more near full masking, where the "
                         "prompt alone decides (helps a text encoder trained from scratch)")
    tr.add_argument("--cond-dropout", type=float, default=0.1, help="share of samples trained with the empty prompt")
    tr.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters of this rank")
    tr.add_argument("--lora-alpha", type=float)
    tr.add_argument("--train-text-encoder", action="store_true", help="train the whole text encoder too")
    tr.add_argument("--text-encoder-lr", type=float,
                    help="the text encoder's learning rate (default: --learning-rate); lower keeps a text encoder "
                         "trained from scratch from collapsing into a constant")
    tr.add_argument("--text-encoder-lora-rank", type=int, default=0, help="with --lora-rank: LoRA on the text encoder")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--ema-decay", type=float, default=0.0, help="> 0: keep EMA weights (e.g. 0.999)")
    tr.add_argument("--cache", type=Path, help="pre-encode tokens and text embeddings here once, train from them")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--keep-checkpoints", type=int, default=3)
    tr.add_argument("--resume", help="a checkpoint folder, or 'latest'")
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--validation-every", type=int, default=0, help="steps between validation images (0: never)")
    tr.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts")
    tr.add_argument("--validation-steps", type=int, default=16, help="sampling steps of validation images")
    tr.set_defaults(run=train_command)

    di = verbs.add_parser("distill", help="distill a one-step Di[M]O student from a multi-step model")
    di.add_argument("--teacher", dest="model", required=True, help="pipeline folder of the multi-step model")
    di.add_argument("--data", required=True, help="prompts: a .txt file (one per line), or any `train` source "
                    "whose captions are read (no images are needed)")
    di.add_argument("--out", type=Path, required=True, help="output folder: checkpoints, metrics, the student")
    di.add_argument("--caption-column", default="caption")
    di.add_argument("--resolution", type=int, help="image side (default: the teacher's)")
    di.add_argument("--batch-size", type=int, default=4, help="prompts per micro-batch and process")
    di.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per update")
    di.add_argument("--max-steps", type=int, default=1000)
    di.add_argument("--learning-rate", type=float, default=1e-5, help="the student's")
    di.add_argument("--aux-learning-rate", type=float, help="the auxiliary model's (default: --learning-rate)")
    di.add_argument("--aux-rounds", type=int, default=1, help="auxiliary model updates per student update")
    di.add_argument("--lr-scheduler", default="constant",
                    choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"))
    di.add_argument("--warmup-steps", type=int, default=0)
    di.add_argument("--weight-decay", type=float, default=0.0)
    di.add_argument("--max-grad-norm", type=float, default=1.0)
    di.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    di.add_argument("--divergence", default="fkl", choices=("fkl", "rkl", "jeffreys"),
                    help="forward KL (default, mode covering), reverse KL (mode seeking), or a mix of both")
    di.add_argument("--jeffreys-beta", type=float, default=0.5, help="reverse KL's share with --divergence jeffreys")
    di.add_argument("--guidance-scale", type=float, default=4.0, help="the teacher's guidance")
    di.add_argument("--negative-prompt", default="", help="the teacher's unconditional prompt")
    di.add_argument("--mask-ratio", type=float, default=0.5, help="share of the student's random input ids masked")
    di.add_argument("--embedding-noise", type=float, default=0.3, help="the student's embedding noise while training")
    di.add_argument("--sample-mask-ratio", type=float, help="the saved student's mask ratio (default: --mask-ratio)")
    di.add_argument("--sample-embedding-noise", type=float, default=0.1, help="the saved student's embedding noise")
    di.add_argument("--label-smoothing", type=float, default=0.1, help="of the auxiliary model's cross-entropy")
    di.add_argument("--train-embeddings", action="store_true",
                    help="also train the student's token embedding and output head (frozen by default)")
    di.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA adapters instead of full weights")
    di.add_argument("--lora-alpha", type=float)
    di.add_argument("--gradient-checkpointing", action="store_true")
    di.add_argument("--ema-decay", type=float, default=0.0, help="> 0: keep EMA weights of the student")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--checkpoint-every", type=int, default=500)
    di.add_argument("--keep-checkpoints", type=int, default=3)
    di.add_argument("--resume", help="a checkpoint folder, or 'latest'")
    di.add_argument("--log-every", type=int, default=10)
    di.add_argument("--validation-every", type=int, default=0, help="steps between one-step validation grids")
    di.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts")
    di.set_defaults(run=distill_command)

    tv = verbs.add_parser("train-vq", help="train or fine-tune the VQ image tokenizer")
    tv.add_argument("--data", required=True, help="same sources as `train`")
    tv.add_argument("--out", type=Path, required=True, help="output folder: checkpoints, metrics, vqvae/")
    tv.add_argument("--model", help="a VQModel folder, or a pipeline folder (its vqvae/), to fine-tune")
    tv.add_argument("--preset", help=f"a new tokenizer of this preset's architecture: {', '.join(_preset_names())}")
    tv.add_argument("--image-column", default="image")
    tv.add_argument("--resolution", type=int, default=256)
    tv.add_argument("--center-crop", action="store_true")
    tv.add_argument("--crop-size", type=int, help="train on crops of this size, at --resolution scale (faster)")
    tv.add_argument("--batch-size", type=int, default=8)
    tv.add_argument("--max-steps", type=int, default=2000)
    tv.add_argument("--learning-rate", type=float, default=2e-4)
    tv.add_argument("--weight-decay", type=float, default=0.0)
    tv.add_argument("--max-grad-norm", type=float, default=1.0)
    tv.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    tv.add_argument("--l1-weight", type=float, default=1.0)
    tv.add_argument("--l2-weight", type=float, default=1.0)
    tv.add_argument("--disc-weight", type=float, default=0.0, help="> 0: add a patch discriminator (GAN loss)")
    tv.add_argument("--disc-start", type=int, default=0, help="step at which the discriminator starts")
    tv.add_argument("--reset-dead-every", type=int, default=0, help="re-seed codes unused over this many steps")
    tv.add_argument("--whitened-weight", type=float, default=0.0,
                    help="> 0: also weigh the squared error in the data's whitened colour space (all hues learn alike)")
    tv.add_argument("--hue-jitter", type=float, default=0.0,
                    help="share of training images shown with their hues rotated (every shape in every colour)")
    tv.add_argument("--hard-pixel-weight", type=float, default=0.0,
                    help="> 0: also weigh each image's worst-reconstructed pixels (helps small objects keep colour)")
    tv.add_argument("--hard-pixel-share", type=float, default=0.05, help="share of pixels counted as hard")
    tv.add_argument("--commitment", type=float, default=0.25, help="weight of the encoder's commitment loss")
    tv.add_argument("--codebook-ema", type=float, default=0.0,
                    help="> 0 (e.g. 0.99): update codes as an EMA of their encoder outputs instead of by gradient")
    tv.add_argument("--init-codebook", action="store_true",
                    help="start a new tokenizer's codebook from encoder outputs (default: diffusers' random init)")
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--checkpoint-every", type=int, default=500)
    tv.add_argument("--keep-checkpoints", type=int, default=3)
    tv.add_argument("--resume", help="a checkpoint folder, or 'latest'")
    tv.add_argument("--log-every", type=int, default=10)
    tv.set_defaults(run=train_vq_command)

    data = verbs.add_parser("data", help="make training data")
    kinds = data.add_subparsers(dest="kind", required=True, metavar="KIND")
    shapes = kinds.add_parser("shapes", help="captioned images of plain shapes (parquet, the training format)")
    shapes.add_argument("--num", type=int, required=True, help="number of images")
    shapes.add_argument("--out", type=Path, required=True, help="a .parquet file, or a folder for shapes.parquet")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=256, help="image side in pixels")
    shapes.add_argument("--held-out", action="store_true", help="only scenes with held-out colour-shape pairs")
    shapes.add_argument("--jitter", type=float, default=0.04,
                        help="largest shift of an object's center from its named place, as a share of the side")
    shapes.add_argument("--partial-captions", type=float, default=0.0, metavar="SHARE",
                        help="share of captions that leave one object's size, colour or shape unsaid (default 0)")
    shapes.set_defaults(run=data_shapes)

    ev = verbs.add_parser("eval", help="judge generated images automatically")
    benches = ev.add_subparsers(dest="bench", required=True, metavar="BENCH")
    es = benches.add_parser("shapes", help="fixed shapes prompts, judged for colour, shape, size, position, relation")
    es.add_argument("--model", default="demo", help="a model folder or hub repo id (default: the shipped demo)")
    es.add_argument("--num", type=int, default=50, help="prompts per category (single, two objects, held-out)")
    es.add_argument("--seed", type=int, default=0, help="fixes the prompt set and the image seeds")
    es.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    es.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    es.add_argument("--size", type=int, help="image side (default: the model's)")
    add_fewer_passes_options(es)
    es.add_argument("--ground-truth", action="store_true", help="judge the data set's own images (checks the judge)")
    es.add_argument("--reconstruct", action="store_true",
                    help="judge the data set's images passed through the model's tokenizer (its ceiling)")
    es.add_argument("--save-images", type=Path, help="write every judged image here")
    es.add_argument("--json", type=Path, help="write the scores and per-image verdicts here (must not exist)")
    add_runtime_options(es)
    add_size_rule_options(es)
    es.set_defaults(run=eval_shapes)

    ui = verbs.add_parser("ui", help="serve the web app (every task) on a local address")
    ui.add_argument("--model", default="demo", help="a model folder or hub repo id (default: the shipped demo)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the internet)")
    ui.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this are turned away")
    ui.add_argument("--concurrency", type=int, default=1, help="requests run at once")
    add_runtime_options(ui)
    ui.add_argument("--allow-pickle", action="store_true", help="also load pickle weights (weights_only=True)")
    ui.add_argument("--student", help="a one-step student of --model (a folder, or demo-1step for the demo): "
                    "offered as the speed 'one-step'")
    ui.set_defaults(run=ui_command)

    sv = verbs.add_parser("serve", help="serve the model over HTTP: the OpenAI Images and AUTOMATIC1111 APIs")
    sv.add_argument("--model", default="demo", help="a model folder or hub repo id (default: the shipped demo)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; any other needs an API key)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", action="append", help="a key clients must send as 'Authorization: Bearer KEY' "
                    "(repeat for several; also MEISSONIC_API_KEY, comma-separated)")
    sv.add_argument("--max-batch", type=int, default=4, help="images run together in one pipeline call, from "
                    "concurrent requests with the same size, steps, guidance and speed")
    sv.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this get 429 + Retry-After")
    sv.add_argument("--max-images", type=int, default=4, help="images one request may ask for")
    sv.add_argument("--max-steps", type=int, default=100, help="sampling steps one request may ask for")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="pixels of an uploaded image or mask")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit in MB")
    sv.add_argument("--speed", choices=SPEEDS, help="the speed level of requests that name none (default exact)")
    add_runtime_options(sv)
    add_size_rule_options(sv)
    sv.add_argument("--allow-pickle", action="store_true", help="also load pickle weights (weights_only=True)")
    sv.add_argument("--ray", action="store_true", help="run the same app as a Ray Serve deployment: --replicas "
                    "copies of the model across the machines of a Ray cluster")
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, one model each")
    sv.add_argument("--ray-address", help="with --ray: a Ray cluster to join (default: start a local one)")
    sv.set_defaults(run=serve_command)

    conv = verbs.add_parser("convert", help="write a copy of a model folder with its weights in another precision")
    conv.add_argument("--model", required=True, help="a model folder or hub repo id")
    conv.add_argument("--out", type=Path, required=True, help="new folder to write")
    conv.add_argument("--dtype", required=True, choices=("fp32", "bf16", "fp16"),
                      help="weight precision of the copy (fp16 halves the size; load it with any --dtype)")
    conv.add_argument("--quantize", choices=QUANTIZE, default="none",
                      help="also quantize the transformer's weights (the copy then loads in --dtype only; bf16 "
                           "quantized copies run on CPU and GPU, fp32 int8 and int4 copies on the CPU only)")
    conv.add_argument("--device", default="cpu", help="where to quantize: the kernels chosen are this device's")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="read a model whose weights are pickle files (with torch.load(weights_only=True)); the "
                           "copy is written as safetensors")
    conv.set_defaults(run=convert_model)

    init = verbs.add_parser("init", help="write a new model folder with random weights from a preset")
    init.add_argument("--preset", required=True, help=f"architecture: {', '.join(_preset_names())}")
    init.add_argument("--out", type=Path, required=True, help="folder to create")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.add_argument("--exist-ok", action="store_true", help="keep an existing model folder instead of failing")
    init.set_defaults(run=init_model)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar and messages only: no weight-loading bars or library chatter on the terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def _preset_names() -> list[str]:
    from .presets import PRESETS

    return list(PRESETS)


# ---------------------------------------------------------------------------------------------- bench


def bench_command(args: argparse.Namespace) -> int:
    from .bench import ONE_STEP, BenchSpec, format_table, run_bench, seed_format

    if args.model is None and args.preset is None:
        args.preset = "meissonic"
    if args.preset is not None and args.preset not in _preset_names():
        raise UsageError(f"--preset {args.preset!r}: choose from {', '.join(_preset_names())}")
    dtypes = _choices(args.dtypes, "--dtypes", ("fp32", "bf16", "fp16"))
    methods = _choices(args.quantize, "--quantize", QUANTIZE)
    speeds = _choices(args.speeds, "--speeds", SPEEDS)
    if args.compile and set(speeds) - {"exact"}:
        raise UsageError("--compile runs fixed shapes; the fast and fastest levels run partial passes of changing "
                         "shapes: bench them without --compile")
    if args.resolution is not None and (args.resolution < 16 or args.resolution % 16):
        raise UsageError(f"--resolution {args.resolution}: must be a positive multiple of 16")
    if args.steps is not None and args.steps < 1 or args.batch < 1:
        raise UsageError(f"--steps {args.steps} and --batch {args.batch}: must be at least 1")
    if args.repeat < 1 or args.iterations < 1:
        raise UsageError(f"--repeat {args.repeat} and --iterations {args.iterations}: must be at least 1")
    if args.iterations > 1 and args.release_text_encoder:
        raise UsageError("--iterations with --release-text-encoder: the text encoder is gone after the first "
                         "generation; time one (--iterations 1)")
    check_vq_tile(args.vq_tile)
    if args.json is not None and args.json.exists():
        raise UsageError(f"--json {str(args.json)!r} exists; choose a new file")
    device = resolve_device(args.device)
    if "fp16" in dtypes and device.type == "cpu":
        raise UsageError("fp16 on CPU is hundreds of times slower than bf16: leave it out of --dtypes")
    if args.offload != "none" and device.type != "cuda":
        raise UsageError(f"--offload {args.offload}: needs a CUDA GPU")
    from .loading import resolve_model_folder, student_folder

    if args.model is not None and student_folder(args.model) is None:
        resolve_model_folder(args.model)  # a bad folder fails here, once, not in every row's process
    if args.student is not None:
        if student_folder(args.student) is None:
            resolve_model_folder(args.student)
        if "exact" not in speeds:
            raise UsageError("--student is timed against the teacher's exact row: keep exact in --speeds")
    specs = [BenchSpec(model=args.model, preset=args.preset, dtype=d, quantize=q, resolution=args.resolution,
                       steps=args.steps, batch=args.batch, guidance=args.guidance,
                       release_text_encoder=args.release_text_encoder, vq_tile=args.vq_tile, offload=args.offload,
                       compile=args.compile, device=str(device), speed=v, warmup=args.warmup,
                       iterations=args.iterations)
             for d in dtypes for q in methods for v in speeds]
    if args.student is not None:  # after the teacher's rows (the first row is the agreement's reference)
        specs += [BenchSpec(model=args.student, dtype=d, quantize=q, resolution=args.resolution, batch=args.batch,
                            release_text_encoder=args.release_text_encoder, vq_tile=args.vq_tile, offload=args.offload,
                            device=str(device), speed=ONE_STEP, warmup=args.warmup, iterations=args.iterations)
                  for d in dtypes for q in methods]
    name = args.model or f"{args.preset} (random weights)"
    where = torch_device_name(device)
    print(f"meissonic bench: {name} on {where}; each row in its own process", flush=True)
    if device.type == "cpu":
        print(f"  {_cpu_matmul_line()}", flush=True)
    try:
        rows = run_bench(specs, agreement=not args.no_agreement, repeat=args.repeat,
                         on_row=lambda r: print(f"  {_round_label(r, args.repeat)}{seed_format(r)}", flush=True))
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    first = rows[0]
    rounds = f", medians of {args.repeat} interleaved rounds" if args.repeat > 1 else ""
    if args.iterations > 1:
        rounds += f", each the median of {args.iterations} generations"
    print(f"\n{first['resolution']}x{first['resolution']}, {first['steps']} steps, batch {args.batch}, guidance "
          f"{first['guidance']:g}, {where}{rounds}")
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cpu_matmul_line() -> str:
    """What `--dtype auto` sees on this CPU: one 1B-sized matmul timed in fp32 and bf16."""
    import torch

    from .runtime import cpu_has_native_bf16, matmul_seconds

    fp32 = matmul_seconds(torch.float32)
    if not cpu_has_native_bf16():
        return f"CPU matmul 256x1024x4096: fp32 {fp32 * 1e3:.1f} ms; no bf16 instructions (auto keeps fp32)"
    bf16 = matmul_seconds(torch.bfloat16)
    return (f"CPU matmul 256x1024x4096: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms "
            f"(bf16 {fp32 / bf16:.2f}x fp32's speed)")


def _round_label(row: dict, repeat: int) -> str:
    return f"round {row['round']}/{repeat}: " if repeat > 1 else ""


def _choices(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise UsageError(f"{flag} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return list(dict.fromkeys(values))


def torch_device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device} ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------- train


def _config(cls, args: argparse.Namespace):
    """The run config from the parsed options of the same names."""
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__})


def train_command(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    cfg = _config(TrainConfig, args)
    out = train(cfg)
    target = f"--model {cfg.model or 'BASE'} --lora {out / 'lora'}" if cfg.lora_rank else f"--model {out}"
    print(f"done: {out} (generate with {target})")
    return 0


def distill_command(args: argparse.Namespace) -> int:
    from .training.distill import DistillConfig, distill

    cfg = _config(DistillConfig, args)
    out = distill(cfg)
    target = f"--model {cfg.model} --lora {out / 'lora'}" if cfg.lora_rank else f"--model {out}"
    print(f"done: {out} (one-step generation with {target})")
    return 0


def train_vq_command(args: argparse.Namespace) -> int:
    from .training.vq_train import VQTrainConfig, train_vq

    out = train_vq(_config(VQTrainConfig, args))
    report = json.loads((out / "vq_report.json").read_text())
    print(f"done: {out / 'vqvae'}: reconstruction MSE {report['mse']:.5f} (PSNR {report['psnr']:.2f} dB), "
          f"codebook usage {report['codebook_usage']:.1%}, perplexity {report['perplexity']:.1f} "
          f"over {report['samples']} samples")
    return 0


def data_shapes(args: argparse.Namespace) -> int:
    from .shapes import write_shapes

    path = write_shapes(args.out, args.num, seed=args.seed, side=args.size, held_out=args.held_out,
                       jitter=args.jitter, partial=args.partial_captions)
    print(f"wrote {path} ({args.num} images, {args.size}x{args.size})")
    return 0


def eval_shapes(args: argparse.Namespace) -> int:
    from .evaluate import (
        format_held_out,
        format_summary,
        ground_truth_images,
        pipeline_images,
        reconstructed_images,
        run_eval,
        write_report,
    )

    if args.num < 1:
        raise UsageError(f"--num {args.num}: must be at least 1")
    check_fewer_passes_args(args)
    check_runtime_args(args)
    if args.json is not None and args.json.exists():
        raise UsageError(f"--json {str(args.json)!r} exists; choose a new file")
    if args.ground_truth and args.reconstruct:
        raise UsageError("choose --ground-truth or --reconstruct, not both")
    if args.ground_truth:
        make, source = ground_truth_images(args.seed), "ground truth (the data set's renderings)"
    elif args.reconstruct:
        pipe = load_pipeline(args.model, torch_dtype("fp32"))  # the tokenizer alone, on the CPU
        make, source = reconstructed_images(pipe.vqvae.eval(), args.seed), f"{args.model} tokenizer reconstructions"
    else:
        device = resolve_device(args.device)
        pipe = load_pipeline(args.model, resolve_dtype(args.dtype, device, args.model))
        prepare_pipeline(pipe, device, args)
        apply_size_rule(pipe, args)
        pipe.set_progress_bar_config(disable=True)
        sampling = fewer_passes_kwargs(args)
        make, source = pipeline_images(pipe, args.steps, args.guidance, args.seed, args.size, sampling), args.model
    result = run_eval(make, args.num, args.seed, args.save_images)
    print(f"shapes eval of {source}, seed {args.seed}, {args.num} prompts per category")
    print(format_summary(result["summary"]))
    print(format_held_out(result["held_out_pairs"]))
    if args.json is not None:
        write_report(args.json, result, {k: str(v) for k, v in vars(args).items() if k != "run"})
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------- ui


def ui_command(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be in 1..65535")
    if args.max_queue < 1 or args.concurrency < 1:
        raise UsageError("--max-queue and --concurrency must be at least 1")
    try:
        from .ui import launch
    except ImportError as err:
        raise UsageError(f"the web UI needs gradio: pip install 'meissonic[ui]' ({reason(err)})") from None
    check_runtime_args(args)
    device = resolve_device(args.device)
    try:
        app, url = launch(args.model, args.host, args.port, args.share, args.max_queue, args.concurrency,
                          resolve_dtype(args.dtype, device, args.model), device, block=False,
                          allow_pickle=args.allow_pickle, options=run_options(args), student=args.student)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"meissonic ui: serving {args.model} on {url} (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0


# ---------------------------------------------------------------------------------------------- serve


def serve_command(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be in 1..65535")
    for flag in ("max_batch", "max_queue", "max_images", "max_steps", "max_pixels"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not args.max_body_mb > 0:
        raise UsageError(f"--max-body-mb {args.max_body_mb}: must be above 0")
    try:
        from .serving.app import api_keys, build_app, is_loopback, load_for_serving, make_engine, serve
    except ImportError as err:
        raise UsageError(f"serving needs FastAPI and uvicorn: pip install 'meissonic[serve]' ({reason(err)})") from None
    keys = api_keys(args.api_key)
    if not keys and not is_loopback(args.host):
        raise UsageError(f"--host {args.host}: listening beyond this machine needs an API key (--api-key KEY or "
                         f"MEISSONIC_API_KEY)")
    check_runtime_args(args)
    resolve_device(args.device)
    from .loading import resolve_model_folder, student_folder

    if student_folder(args.model) is None:
        resolve_model_folder(args.model)  # a bad folder fails here, before the server starts
    if args.ray:
        if args.replicas < 1:
            raise UsageError(f"--replicas {args.replicas}: must be at least 1")
        from .serving.ray_serve import serve_on_ray

        return serve_on_ray(args, keys)
    engine = make_engine(args, partial(load_for_serving, args)).start()
    print(f"meissonic serve: {args.model} on http://{args.host}:{args.port} (OpenAI: /v1, AUTOMATIC1111: "
          f"/sdapi/v1; {'keys required' if keys else 'no key'}; Ctrl+C to stop)", flush=True)
    code = serve(build_app(engine, keys), engine, args.host, args.port)
    if engine.error:
        raise UsageError(f"cannot serve {args.model!r}: {engine.error}")
    return code


# ---------------------------------------------------------------------------------------------- convert


def convert_model(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise UsageError(f"--out {str(args.out)!r} exists; choose a new folder")
    device = resolve_device(args.device)
    if args.dtype == "fp16" and device.type == "cpu" and args.quantize != "none":
        raise UsageError("--dtype fp16 with --quantize on CPU: quantized fp16 kernels are GPU-only; use bf16")
    pipe = load_pipeline(args.model, torch_dtype(args.dtype), args.allow_pickle)
    if args.quantize != "none":
        pipe.to(device)
        pipe.quantize(args.quantize)
    save_new_folder(pipe, args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    quantized = "" if args.quantize == "none" else f", transformer {args.quantize}"
    print(f"wrote {args.out} ({args.dtype}{quantized}, {size / 2**20:.1f} MiB)")
    return 0


# ---------------------------------------------------------------------------------------------- init


def init_model(args: argparse.Namespace) -> int:
    from .loading import ModelFolderError, check_model_folder
    from .presets import build_pipeline, get_preset

    get_preset(args.preset)
    if args.out.exists():
        if not args.exist_ok:
            raise UsageError(f"{str(args.out)!r} exists; choose a new folder (or pass --exist-ok to keep it)")
        try:
            check_model_folder(args.out)
        except ModelFolderError as err:
            raise UsageError(f"{str(args.out)!r} exists but is not a model folder ({err})") from None
        print(f"kept existing model folder {args.out}")
        return 0
    pipe = build_pipeline(args.preset, seed=args.seed)
    save_new_folder(pipe, args.out)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote {args.out} (preset {args.preset}, transformer {params:,} parameters, random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
