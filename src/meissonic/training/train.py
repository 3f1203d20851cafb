"""`meissonic train`: one explicit training loop for the Meissonic transformer (full or LoRA), built on accelerate.

Exact resume: every random choice of a step (which samples, their crops, the masks, the condition dropout) is drawn
from a generator seeded by (seed, step, micro-batch, rank), so a resumed run repeats the uninterrupted one; the
checkpoint holds the trainable weights, optimizer, learning-rate schedule and EMA state.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..pipeline import MeissonicPipeline
from ..text import text_length, tokenize
from ..vq import encode_image
from .checkpoint import append_metrics, read_state, resolve_resume, save_checkpoint, start_run_folder
from .common import RunConfig, TrainingError, adamw, load_vqvae
from .data import SampleOrder, load_images, open_dataset, step_generator
from .objective import drop_conditions, mask_rate_timestep, mask_tokens, masked_cross_entropy, sample_mask_ratios

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class TrainConfig(RunConfig):
    """`meissonic train`: `model` is a pipeline folder whose transformer is fine-tuned (or whose VQ/text encoder is
    reused with a new `preset` transformer)."""

    vqvae: str | None = None  # a tokenizer folder (e.g. `train-vq` output) replacing the pipeline's
    score_column: str = "aesthetic_score"
    resolution: int = 256
    batch_size: int = 4
    gradient_accumulation: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    min_mask_rate: float = 0.0
    mask_rate_power: float = 1.0  # > 1: more samples near full masking (see objective.sample_mask_ratios)
    cond_dropout: float = 0.1
    lora_rank: int = 0  # > 0: train LoRA adapters instead of the full transformer
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # the text encoder's own learning rate (default: learning_rate)
    text_encoder_lora_rank: int = 0  # > 0 (with lora_rank): LoRA adapters on the text encoder too
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # > 0: keep an EMA of the trained weights, used for validation and the final model
    validation_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 16
    cache: Path | None = None  # pre-encoded tokens and text embeddings (built on first use)


def check_config(cfg: TrainConfig) -> None:
    if (cfg.model is None) == (cfg.preset is None) and cfg.model is None:
        raise TrainingError("give --model (a pipeline folder to fine-tune) or --preset (a new transformer)")
    positive = {"resolution": cfg.resolution, "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
                "gradient_accumulation": cfg.gradient_accumulation, "checkpoint_every": cfg.checkpoint_every,
                "log_every": cfg.log_every}
    for name, value in positive.items():
        if value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if cfg.resolution % 16:
        raise TrainingError(f"--resolution {cfg.resolution}: must be a multiple of 16")
    if not 0 <= cfg.cond_dropout <= 1 or not 0 <= cfg.min_mask_rate <= 1:
        raise TrainingError("--cond-dropout and --min-mask-rate must lie in [0, 1]")
    if not 0 < cfg.mask_rate_power <= 10:
        raise TrainingError(f"--mask-rate-power {cfg.mask_rate_power}: must be in (0, 10]")
    if cfg.learning_rate <= 0:
        raise TrainingError(f"--learning-rate {cfg.learning_rate}: must be positive")
    if not 0 <= cfg.ema_decay < 1:
        raise TrainingError(f"--ema-decay {cfg.ema_decay}: must lie in [0, 1)")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainingError(f"--mixed-precision {cfg.mixed_precision!r}: choose no, bf16 or fp16")
    if cfg.text_encoder_lr is not None and not cfg.text_encoder_lr > 0:
        raise TrainingError(f"--text-encoder-lr {cfg.text_encoder_lr}: must be positive")
    if cfg.text_encoder_lr is not None and not (cfg.train_text_encoder or cfg.text_encoder_lora_rank):
        raise TrainingError("--text-encoder-lr goes with --train-text-encoder or --text-encoder-lora-rank")
    if cfg.text_encoder_lora_rank and not cfg.lora_rank:
        raise TrainingError("--text-encoder-lora-rank goes with --lora-rank (a LoRA run)")
    if cfg.text_encoder_lora_rank and cfg.train_text_encoder:
        raise TrainingError("choose --train-text-encoder (full) or --text-encoder-lora-rank, not both")
    if cfg.keep_checkpoints is not None and cfg.keep_checkpoints < 1:
        raise TrainingError(f"--keep-checkpoints {cfg.keep_checkpoints}: must be at least 1")


def build_models(cfg: TrainConfig) -> MeissonicPipeline:
    """The pipeline whose transformer is trained: loaded, or with a new transformer from a preset."""
    from ..presets import build_pipeline, get_preset, seeded_init
    from ..transformer import MeissonicTransformer

    from ..pipeline import check_components

    if cfg.model is None:
        pipe = build_pipeline(cfg.preset, seed=cfg.seed)
    else:
        pipe = MeissonicPipeline.from_pretrained(cfg.model)
        if cfg.preset is not None:
            preset = get_preset(cfg.preset)
            with seeded_init(cfg.seed):
                pipe.transformer = MeissonicTransformer(**preset.transformer)
            pipe.defaults = preset.defaults
    if cfg.model is None or cfg.preset is not None:  # a new transformer samples by default at the size it learnt
        pipe.defaults = {**pipe.defaults, "resolution": cfg.resolution}
    if cfg.vqvae is not None:
        pipe.vqvae = load_vqvae(cfg.vqvae, "--vqvae")
    try:
        check_components(pipe)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return pipe


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    check_config(cfg)
    # accelerate keeps one global state per process; a second run in the same process (library use, tests) may ask
    # for another precision, so start from a clean state (the distributed part is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    dataset = open_dataset(cfg.data, cfg.image_column, cfg.caption_column, cfg.score_column)
    pipe = build_models(cfg)
    transformer, vqvae, text_encoder, tokenizer = pipe.transformer, pipe.vqvae, pipe.text_encoder, pipe.tokenizer
    device = accelerator.device
    vqvae.requires_grad_(False).eval().to(device)
    text_encoder.requires_grad_(False).eval().to(device)
    transformer.train()

    if cfg.lora_rank:
        add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    trains_text = cfg.train_text_encoder or cfg.text_encoder_lora_rank > 0
    if cfg.text_encoder_lora_rank:  # peft's own wrapper: transformers' adapter API needs a newer peft
        from peft import LoraConfig, get_peft_model

        from ..presets import seeded_init

        with seeded_init(cfg.seed + 1):
            text_encoder = get_peft_model(text_encoder, LoraConfig(
                r=cfg.text_encoder_lora_rank, lora_alpha=cfg.text_encoder_lora_rank, init_lora_weights="gaussian",
                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        text_encoder.train()
    elif trains_text:
        text_encoder.requires_grad_(True).train()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if trains_text:
            text_encoder.gradient_checkpointing_enable()
    params = [p for p in transformer.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if trains_text else []
    trained = params + text_params  # what the optimizer moves, and the EMA follows (text encoder included)
    groups = [{"params": params}]
    if text_params:  # its own group, so it can move slower than the transformer (a jointly trained encoder
        # that moves as fast tends to collapse into a constant the transformer uses as a bias)
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = adamw(groups, cfg.learning_rate, cfg.weight_decay, cfg.use_8bit_adam, cfg.adam_betas)
    schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps)
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trained, decay=cfg.ema_decay, foreach=False)

    start_step = 0
    checkpoints = cfg.out / "checkpoints"
    resume = resolve_resume(cfg.resume, checkpoints) if cfg.resume else None
    if resume is not None:
        start_step = _load_checkpoint(resume, cfg, transformer, text_encoder, optimizer, schedule, ema)
    if trains_text:
        transformer, text_encoder, optimizer = accelerator.prepare(transformer, text_encoder, optimizer)
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)
    convention = model.config.get("mask_rate_conditioning", "step_index")
    mask_id = model.mask_token_id
    cache = _open_cache(cfg, accelerator, dataset, vqvae, tokenizer, text_encoder) if cfg.cache else None
    order = SampleOrder(len(dataset), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    metrics_path = cfg.out / "metrics.jsonl"
    if accelerator.is_main_process:
        start_run_folder(cfg.out, start_step, "train_config.json", asdict(cfg))

    length = text_length(accelerator.unwrap_model(text_encoder))

    def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenize(tokenizer, captions, length).to(device)
        out = text_encoder(ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and accelerator.is_main_process),
               desc="train", unit="step")
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation * accelerator.num_processes
    empty_text = None  # the empty prompt's encoding, for condition dropout
    for step in range(start_step, cfg.max_steps):
        began = time.perf_counter()
        total, epoch = 0.0, 0.0
        for micro in range(cfg.gradient_accumulation):
            gen = step_generator(cfg.seed, step, micro, accelerator.process_index)
            indices, epoch = order(step * cfg.gradient_accumulation + micro)
            if cache is not None:
                rows = [cache[i] for i in indices]
                tokens = torch.stack([r[0] for r in rows]).long().to(device)
                micro_conds, captions = torch.stack([r[3] for r in rows]), [cache.captions[i] for i in indices]
            else:
                pixels, micro_conds, captions = load_images(dataset, indices, cfg.resolution, gen, cfg.center_crop)
                with torch.no_grad():
                    tokens = encode_image(vqvae, pixels.to(device))
            ratios = sample_mask_ratios(len(indices), gen, cfg.min_mask_rate, cfg.mask_rate_power)
            inputs, labels, share = mask_tokens(tokens, ratios, mask_id, gen)
            timestep = mask_rate_timestep(share, convention, pipe.defaults["steps"]).to(device)
            last = micro == cfg.gradient_accumulation - 1
            sync = nullcontext() if last else accelerator.no_sync(transformer)
            if cache is not None and not trains_text:  # frozen text encoder: its cached outputs (stacked outside
                # autocast, which refuses fp16 inputs on CPU)
                hidden = torch.stack([r[1] for r in rows]).to(device, torch.float32)
                pooled = torch.stack([r[2] for r in rows]).to(device, torch.float32)
                empty_hidden, empty_pooled = (t.to(device, torch.float32) for t in cache.empty)
            with sync, accelerator.autocast():
                if cache is None or trains_text:
                    with nullcontext() if trains_text else torch.no_grad():
                        hidden, pooled = encode_text(captions)
                        if cfg.cond_dropout and (trains_text or empty_text is None):
                            empty_text = encode_text([""])  # constant while the encoder is frozen: once
                        empty_hidden, empty_pooled = empty_text if cfg.cond_dropout else (None, None)
                if cfg.cond_dropout:
                    hidden, pooled, _ = drop_conditions(hidden, pooled, empty_hidden, empty_pooled,
                                                        cfg.cond_dropout, gen)
                logits = transformer(hidden_states=inputs, encoder_hidden_states=hidden, pooled_projections=pooled,
                                     micro_conds=micro_conds.to(device), timestep=timestep)
                loss = masked_cross_entropy(logits, labels.to(device))
                accelerator.backward(loss / cfg.gradient_accumulation)
            total += loss.detach().float().item() / cfg.gradient_accumulation
        if not math.isfinite(total):
            raise TrainingError(f"loss became {total} at step {step + 1}; the last good checkpoint is kept in "
                                f"{checkpoints} (lower --learning-rate or use --mixed-precision bf16)")
        grad_norm = accelerator.clip_grad_norm_(trained, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trained)
        done = step + 1
        loss_mean = accelerator.reduce(torch.tensor(total, device=device), reduction="mean").item()
        rate = samples_per_step / (time.perf_counter() - began)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.4f}", samples_s=f"{rate:.2f}")
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
            record = {"step": done, "loss": loss_mean, "lr": schedule.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "samples_per_s": rate, "epoch": epoch,
                      "processes": accelerator.num_processes}
            append_metrics(metrics_path, record)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            accelerator.wait_for_everyone()
            # every rank takes part in gathering the weights (needed when FSDP shards them); rank 0 writes
            weights = trainable_state(model, True) if cfg.lora_rank else accelerator.get_state_dict(transformer)
            if accelerator.is_main_process:
                unwrapped_text = accelerator.unwrap_model(text_encoder) if trains_text else None
                save_checkpoint(checkpoints, done,
                                lambda folder: _write_checkpoint(folder, cfg, weights, unwrapped_text, optimizer,
                                                                 schedule, ema),
                                {"seed": cfg.seed, "max_steps": cfg.max_steps}, cfg.keep_checkpoints)
        if cfg.validation_every and cfg.validation_prompts and done % cfg.validation_every == 0:
            if accelerator.is_main_process:
                _validate(pipe, model, trained, ema, cfg, done, device)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(pipe, model, accelerator.unwrap_model(text_encoder), trained, ema, cfg, trains_text)
    accelerator.end_training()
    return cfg.out


def add_lora(transformer, rank: int, alpha: float | None, targets: list[str], seed: int) -> None:
    """Freeze the transformer and give it trainable LoRA adapters (seeded, so a run repeats)."""
    from peft import LoraConfig

    from ..presets import seeded_init

    transformer.requires_grad_(False)
    with seeded_init(seed):
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                           init_lora_weights="gaussian"))


def _open_cache(cfg: TrainConfig, accelerator, dataset, vqvae, tokenizer, text_encoder):
    from .cache import EncodedCache, build_cache, cache_identity, fingerprint

    identity = cache_identity(cfg.data, cfg.resolution, cfg.center_crop, cfg.seed, len(dataset),
                              fingerprint(vqvae), fingerprint(text_encoder))
    folder = Path(cfg.cache)
    if accelerator.is_main_process and not (folder / "cache.json").is_file():
        # encoded in the run's precision (bf16 is ~1.4x faster on CPUs)
        build_cache(folder, identity, dataset, vqvae, tokenizer, text_encoder, progress=cfg.progress,
                    precision=accelerator.autocast)
    accelerator.wait_for_everyone()
    try:
        return EncodedCache(folder, identity, text_live=cfg.train_text_encoder or cfg.text_encoder_lora_rank > 0)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def trainable_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], lora: bool) -> None:
    """Put back what `trainable_state` saved: the adapters' weights, or the whole state."""
    if lora:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        model.load_state_dict(weights)


def _write_checkpoint(folder: Path, cfg, weights: dict, text_encoder, optimizer, schedule, ema) -> None:
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, folder / "transformer.safetensors")
    if text_encoder is not None:
        state = trainable_state(text_encoder, bool(cfg.text_encoder_lora_rank))
        save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / "text_encoder.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(schedule.state_dict(), folder / "lr_scheduler.pt")
    if ema is not None:
        torch.save(ema.state_dict(), folder / "ema.pt")


def _load_checkpoint(path: Path, cfg, transformer, text_encoder, optimizer, schedule, ema) -> int:
    state = read_state(path)
    load_trainable_state(transformer, load_file(path / "transformer.safetensors"), bool(cfg.lora_rank))
    if (path / "text_encoder.safetensors").is_file():
        load_trainable_state(text_encoder, load_file(path / "text_encoder.safetensors"),
                             bool(cfg.text_encoder_lora_rank))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    schedule.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if ema is not None and (path / "ema.pt").is_file():
        ema.load_state_dict(torch.load(path / "ema.pt", weights_only=True))
    return int(state["step"])


class EmaWeights:
    """Context: the EMA weights in the model for its body, the trained ones restored after."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def _validate(pipe: MeissonicPipeline, model, params, ema, cfg: TrainConfig, step: int, device) -> Path:
    return validation_grid(pipe, model, params, ema, cfg.validation_prompts, cfg.resolution, cfg.seed, device,
                           cfg.out / "validation" / f"step-{step}.png", num_inference_steps=cfg.validation_steps)


@torch.no_grad()
def validation_grid(pipe: MeissonicPipeline, model, params, ema, prompts: list[str], resolution: int, seed: int,
                    device, path: Path, **sampling) -> Path:
    """One image per prompt (seed + i) from `model` with its EMA weights, as one grid image at `path`; `sampling`
    goes to the pipeline's call."""
    from ..outputs import image_grid

    was_training = model.training
    model.eval()
    pipe.transformer = model
    pipe.set_progress_bar_config(disable=True)
    with EmaWeights(ema, params), torch.autocast(device.type, enabled=False):
        images = pipe(prompt=prompts, height=resolution, width=resolution,
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
                      **sampling).images
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


def _save_final(pipe: MeissonicPipeline, model, text_encoder, params, ema, cfg: TrainConfig,
                trains_text: bool) -> None:
    with EmaWeights(ema, params):
        if cfg.lora_rank:
            model.save_lora_adapter(cfg.out / "lora")
            (cfg.out / "lora" / "base_model.json").write_text(json.dumps({"base_model": cfg.model}) + "\n")
        else:
            pipe.transformer = model
            pipe.save_pretrained(cfg.out)
    if cfg.text_encoder_lora_rank:  # the peft-wrapped encoder writes only its adapter
        text_encoder.save_pretrained(cfg.out / "lora" / "text_encoder_lora")
    elif cfg.lora_rank and trains_text:  # a LoRA run that also trained the whole text encoder: keep it beside
        pipe.text_encoder.save_pretrained(cfg.out / "lora" / "text_encoder")
