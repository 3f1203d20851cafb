"""`meissonic distill`: a one-step Di[M]O student (arXiv 2503.15457, ICCV 2025) from a multi-step teacher, built
from the training loop's parts (accelerate, EMA, atomic checkpoints and exact resume, metrics.jsonl, validation
grids, LoRA or full weights).

Three copies of the teacher's transformer take part: the teacher (frozen), the student (it maps random ids with a
fixed share masked to a whole image in one pass, as `meissonic.one_step` samples it) and an auxiliary model that
keeps track of the distribution of the student's images. Data: prompts only. Each step:

1. Student update. The student samples every position in one pass; its logits z keep their gradient. The sampled
   tokens are re-masked at a cosine-schedule ratio; the teacher (guided, the negative prompt as the unconditional
   branch) and the auxiliary model (conditional) predict the re-masked positions. There the student's logits move
   along g, the gradient of the chosen divergence between the two predictions: forward KL g = p_aux - p_teacher
   (the default; mode covering), reverse KL g = p_aux * (log p_aux - log p_teacher - KL(p_aux || p_teacher)), or
   Jeffreys, (1 - beta) forward + beta reverse. The loss is 0.5 * ||z - stopgrad(z - g)||^2 summed over the
   re-masked positions and averaged over images, so its gradient on z is g.
2. Auxiliary updates (`aux_rounds` of them). A fresh student sample (no gradient), re-masked at a cosine-schedule
   ratio; the auxiliary model learns it with masked cross-entropy, label smoothing 0.1.

Each update takes `gradient_accumulation` micro-batches of `batch_size` prompts per process.

The student starts as the teacher; its token embedding and output head stay frozen (as the published run's). The
mask-rate condition given to the teacher and the auxiliary model follows the teacher's convention (as `meissonic
train`); the student's is the one-step plan's (0 for the published students). Every random draw of a step comes
from a generator seeded by (seed, step, round, rank), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..one_step import OneStep, draw_tokens, student_inputs
from ..pipeline import MeissonicPipeline
from .checkpoint import append_metrics, read_state, resolve_resume, save_checkpoint, start_run_folder
from .common import RunConfig, TrainingError, adamw
from .data import DEFAULT_SCORE, DataError, SampleOrder, read_prompts, step_generator
from .objective import IGNORE, mask_rate_timestep, mask_tokens, masked_cross_entropy, sample_mask_ratios
from .train import LORA_TARGETS, EmaWeights, add_lora, load_trainable_state, trainable_state, validation_grid

DIVERGENCES = ("fkl", "rkl", "jeffreys")


@dataclass
class DistillConfig(RunConfig):
    """`meissonic distill`: `model` is the teacher's pipeline folder; `data` a .txt of prompts (one per line) or any
    training source, whose captions are the prompts."""

    resolution: int | None = None  # default: the teacher's
    batch_size: int = 4
    gradient_accumulation: int = 1  # micro-batches per update (of the student, and of the auxiliary model)
    max_steps: int = 1000
    learning_rate: float = 1e-5  # the student's
    aux_learning_rate: float | None = None  # default: learning_rate
    aux_rounds: int = 1  # auxiliary model updates per student update
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    divergence: str = "fkl"
    jeffreys_beta: float = 0.5  # reverse KL's share in "jeffreys"
    guidance_scale: float = 4.0  # the teacher's guidance
    negative_prompt: str = ""  # the teacher's unconditional branch
    mask_ratio: float = 0.5  # share of the student's random input ids masked (the published run's 0.5)
    embedding_noise: float = 0.3  # p of the student's embedding noise while training (the published run's 0.3)
    label_smoothing: float = 0.1  # of the auxiliary model's cross-entropy
    train_embeddings: bool = False  # also train the student's token embedding and output head
    score: float = DEFAULT_SCORE  # the aesthetic micro-condition
    lora_rank: int = 0  # > 0: LoRA adapters on the student and the auxiliary model instead of full weights
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    validation_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    # how the saved student samples (`OneStep`); default: the training mask ratio, and embedding noise 0.1 (the
    # published sampling script's)
    sample_mask_ratio: float | None = None
    sample_embedding_noise: float = 0.1

    def training_plan(self) -> OneStep:
        return OneStep(mask_ratio=self.mask_ratio, embedding_noise=self.embedding_noise)

    def sampling_plan(self) -> OneStep:
        ratio = self.mask_ratio if self.sample_mask_ratio is None else self.sample_mask_ratio
        return OneStep(mask_ratio=ratio, embedding_noise=self.sample_embedding_noise)


def check_config(cfg: DistillConfig) -> None:
    if cfg.model is None:
        raise TrainingError("give --teacher: the pipeline folder of the multi-step model to distill")
    for name in ("batch_size", "gradient_accumulation", "max_steps", "aux_rounds", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.resolution is not None and (cfg.resolution < 16 or cfg.resolution % 16):
        raise TrainingError(f"--resolution {cfg.resolution}: must be a multiple of 16")
    for name in ("learning_rate", "aux_learning_rate"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise TrainingError(f"--{name.replace('_', '-')} {value}: must be positive")
    if cfg.divergence not in DIVERGENCES:
        raise TrainingError(f"--divergence {cfg.divergence!r}: choose {', '.join(DIVERGENCES)}")
    if not 0 <= cfg.jeffreys_beta <= 1:
        raise TrainingError(f"--jeffreys-beta {cfg.jeffreys_beta}: must lie in [0, 1]")
    if not math.isfinite(cfg.guidance_scale) or cfg.guidance_scale < 1:
        raise TrainingError(f"--guidance-scale {cfg.guidance_scale}: must be at least 1 (1: no guidance)")
    if not 0 <= cfg.label_smoothing < 1:
        raise TrainingError(f"--label-smoothing {cfg.label_smoothing}: must lie in [0, 1)")
    if not 0 <= cfg.ema_decay < 1:
        raise TrainingError(f"--ema-decay {cfg.ema_decay}: must lie in [0, 1)")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainingError(f"--mixed-precision {cfg.mixed_precision!r}: choose no, bf16 or fp16")
    if cfg.keep_checkpoints is not None and cfg.keep_checkpoints < 1:
        raise TrainingError(f"--keep-checkpoints {cfg.keep_checkpoints}: must be at least 1")
    if cfg.train_embeddings and cfg.lora_rank:
        raise TrainingError("--train-embeddings trains full weights: it does not go with --lora-rank")
    try:  # the plans' own checks, with their messages
        cfg.training_plan(), cfg.sampling_plan()
    except ValueError as err:
        raise TrainingError(str(err)) from None


def divergence_gradient(teacher: torch.Tensor, aux: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Logits (M, V) of the teacher and the auxiliary model at the same positions -> g (M, V), the direction the
    student's logits there move against (see the module docstring), in float32."""
    return _gradient(*_log_probs(teacher, aux), kind, beta)


def _log_probs(teacher: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.log_softmax(teacher.float(), -1), F.log_softmax(aux.float(), -1)


def _gradient(log_t: torch.Tensor, log_a: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """`divergence_gradient` from the two models' log-probabilities (M, V)."""
    p_t, p_a = log_t.exp(), log_a.exp()
    forward = p_a - p_t
    if kind == "fkl":
        return forward
    ratio = log_a - log_t
    reverse = p_a * (ratio - (p_a * ratio).sum(-1, keepdim=True))
    if kind == "rkl":
        return reverse
    if kind == "jeffreys":
        return (1 - beta) * forward + beta * reverse
    raise ValueError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}")


def distribution_matching_loss(student: torch.Tensor, grad: torch.Tensor, batch: int) -> torch.Tensor:
    """0.5 * ||z - stopgrad(z - g)||^2 over the rows, divided by the images: its gradient on z (M, V) is g / batch."""
    z = student.float()
    return 0.5 * (z - (z - grad).detach()).pow(2).sum() / batch


class _Models:
    """The teacher, student and auxiliary transformers, and how each is called on a batch."""

    def __init__(self, pipe: MeissonicPipeline, cfg: DistillConfig, device):
        teacher = pipe.transformer
        self.teacher = teacher.requires_grad_(False).eval().to(device)
        self.student = copy.deepcopy(teacher)
        self.aux = copy.deepcopy(teacher)
        for seed, model in ((cfg.seed, self.student), (cfg.seed + 1, self.aux)):
            if cfg.lora_rank:
                add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed)
            else:
                model.requires_grad_(True)
            model.train()
            if cfg.gradient_checkpointing:
                model.enable_gradient_checkpointing()
        if not cfg.lora_rank and not cfg.train_embeddings:  # the published run's choice: embedding and head frozen
            self.student.embed.requires_grad_(False)
            self.student.mlm_layer.requires_grad_(False)
        config = teacher.config
        self.convention = config.get("mask_rate_conditioning", "step_index")
        self.steps = pipe.defaults["steps"]
        self.codebook, self.mask_id = config.codebook_size, pipe.scheduler.config.mask_token_id
        self.width = config.num_attention_heads * config.attention_head_dim

    def student_pass(self, student, plan: OneStep, gen: torch.Generator, grid, hidden, pooled, micro):
        """The student's one pass -> logits (B, V, h, w); its inputs from `gen`."""
        batch = hidden.shape[0]
        ids, noise = student_inputs(plan, [gen] * batch, grid, self.codebook, self.mask_id, self.width, hidden.device)
        return student(hidden_states=ids, encoder_hidden_states=hidden, pooled_projections=pooled, micro_conds=micro,
                       timestep=torch.tensor([plan.condition], device=hidden.device), embedding_noise=noise)

    def remask(self, tokens: torch.Tensor, gen: torch.Generator):
        """Student tokens (B, h, w) re-masked at cosine-schedule ratios -> (inputs, labels, timestep)."""
        inputs, labels, share = mask_tokens(tokens, sample_mask_ratios(tokens.shape[0], gen), self.mask_id, gen)
        return inputs, labels.to(tokens.device), mask_rate_timestep(share, self.convention, self.steps).to(tokens.device)

    def predict(self, model, inputs, timestep, hidden, pooled, micro) -> torch.Tensor:
        return model(hidden_states=inputs, encoder_hidden_states=hidden, pooled_projections=pooled,
                     micro_conds=micro, timestep=timestep)

    def guided_teacher(self, inputs, timestep, hidden, pooled, negative, micro, scale: float) -> torch.Tensor:
        if scale == 1:
            return self.predict(self.teacher, inputs, timestep, hidden, pooled, micro)
        batch = inputs.shape[0]
        neg_pooled, neg_hidden = (t.expand(batch, *t.shape[1:]) for t in negative)
        both = self.predict(self.teacher, torch.cat([inputs, inputs]), torch.cat([timestep, timestep]),
                            torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled]), torch.cat([micro, micro]))
        uncond, cond = both.chunk(2)
        return uncond + scale * (cond - uncond)


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) a distillation; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    check_config(cfg)
    try:
        prompts = read_prompts(cfg.data, cfg.caption_column)
    except DataError as err:
        raise TrainingError(str(err)) from None
    AcceleratorState._reset_state()  # see train.train
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    pipe = MeissonicPipeline.from_pretrained(cfg.model)
    if pipe.one_step_mode is not None:
        raise TrainingError(f"--teacher {cfg.model!r} is a one-step student; distill a multi-step model")
    resolution = cfg.resolution or pipe.defaults["resolution"]
    pipe.check_size(resolution, resolution)
    pipe.text_encoder.requires_grad_(False).eval().to(device)
    pipe.vqvae.requires_grad_(False).eval().to(device)
    models = _Models(pipe, cfg, device)
    student_params = [p for p in models.student.parameters() if p.requires_grad]
    aux_params = [p for p in models.aux.parameters() if p.requires_grad]
    opt_student = adamw(student_params, cfg.learning_rate, cfg.weight_decay, betas=cfg.adam_betas)
    opt_aux = adamw(aux_params, cfg.aux_learning_rate or cfg.learning_rate, cfg.weight_decay, betas=cfg.adam_betas)
    schedules = [get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                               num_training_steps=cfg.max_steps) for opt in (opt_student, opt_aux)]
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student_params, decay=cfg.ema_decay, foreach=False)
    checkpoints = cfg.out / "checkpoints"
    resume = resolve_resume(cfg.resume, checkpoints) if cfg.resume else None
    start_step = 0
    if resume is not None:
        start_step = _load_checkpoint(resume, cfg, models, (opt_student, opt_aux), schedules, ema)
    student, aux, opt_student, opt_aux = accelerator.prepare(models.student, models.aux, opt_student, opt_aux)
    unwrapped = accelerator.unwrap_model(student)
    order = SampleOrder(len(prompts), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    metrics_path = cfg.out / "metrics.jsonl"
    if accelerator.is_main_process:
        start_run_folder(cfg.out, start_step, "distill_config.json", asdict(cfg))
        if cfg.validation_every and cfg.validation_prompts and not (cfg.out / "validation" / "teacher.png").exists():
            validation_grid(pipe, models.teacher, [], None, cfg.validation_prompts, resolution, cfg.seed, device,
                            cfg.out / "validation" / "teacher.png", guidance_scale=cfg.guidance_scale)
    grid = (resolution // pipe.vae_scale_factor,) * 2
    train_plan = cfg.training_plan()
    with torch.no_grad():
        negative = pipe.encode_prompt([cfg.negative_prompt], device)  # (1, P), (1, L, C)

    def conditions(indices: list[int]):
        with torch.no_grad():
            pooled, hidden = pipe.encode_prompt([prompts[i] for i in indices], device)
        micro = torch.tensor([resolution, resolution, 0, 0, cfg.score], device=device).expand(len(indices), -1)
        return hidden, pooled, micro

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and accelerator.is_main_process),
               desc="distill", unit="step")
    for step in range(start_step, cfg.max_steps):
        began = time.perf_counter()
        # 1. the student, pushed along the divergence between the teacher's and the auxiliary model's predictions
        accumulate, per_step = cfg.gradient_accumulation, cfg.gradient_accumulation * (1 + cfg.aux_rounds)
        loss_value = kl = 0.0
        for micro_step in range(accumulate):
            gen = step_generator(cfg.seed, step, micro_step, accelerator.process_index)
            indices, epoch = order(step * per_step + micro_step)
            hidden, pooled, micro = conditions(indices)
            sync = nullcontext() if micro_step == accumulate - 1 else accelerator.no_sync(student)
            with sync, accelerator.autocast():
                logits = models.student_pass(student, train_plan, gen, grid, hidden, pooled, micro)  # (B, V, h, w)
                with torch.no_grad():
                    tokens = draw_tokens(logits.detach(), OneStep(), [gen] * len(indices))
                    inputs, labels, timestep = models.remask(tokens, gen)
                    taken = labels != IGNORE  # (B, h, w)
                    teacher_rows = models.guided_teacher(inputs, timestep, hidden, pooled, negative, micro,
                                                         cfg.guidance_scale).permute(0, 2, 3, 1)[taken]
                    aux_rows = models.predict(aux, inputs, timestep, hidden, pooled, micro).permute(0, 2, 3, 1)[taken]
                    log_t, log_a = _log_probs(teacher_rows, aux_rows)  # once, for the gradient and the metric
                    grad = _gradient(log_t, log_a, cfg.divergence, cfg.jeffreys_beta)
                    kl += _forward_kl(log_t, log_a) / accumulate
                loss = distribution_matching_loss(logits.permute(0, 2, 3, 1)[taken], grad, len(indices))
                accelerator.backward(loss / accumulate)
            loss_value += loss.detach().float().item() / accumulate
        student_norm = accelerator.clip_grad_norm_(student_params, cfg.max_grad_norm)
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(student_params)
        # 2. the auxiliary model, taught the student's current images: `aux_rounds` updates
        aux_loss = 0.0
        for round_ in range(cfg.aux_rounds):
            for micro_step in range(accumulate):
                index = accumulate * (1 + round_) + micro_step
                gen = step_generator(cfg.seed, step, index, accelerator.process_index)
                indices, _ = order(step * per_step + index)
                hidden, pooled, micro = conditions(indices)
                sync = nullcontext() if micro_step == accumulate - 1 else accelerator.no_sync(aux)
                with sync, accelerator.autocast():
                    with torch.no_grad():
                        logits = models.student_pass(student, train_plan, gen, grid, hidden, pooled, micro)
                        tokens = draw_tokens(logits, OneStep(), [gen] * len(indices))
                        inputs, labels, timestep = models.remask(tokens, gen)
                    loss_aux = masked_cross_entropy(models.predict(aux, inputs, timestep, hidden, pooled, micro),
                                                    labels, cfg.label_smoothing)
                    accelerator.backward(loss_aux / accumulate)
                aux_loss += loss_aux.detach().float().item() / (accumulate * cfg.aux_rounds)
            aux_norm = accelerator.clip_grad_norm_(aux_params, cfg.max_grad_norm)
            opt_aux.step()
            opt_aux.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
        values = {"loss": loss_value, "kl": kl, "aux_loss": aux_loss}
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingError(f"the losses became {values} at step {step + 1}; the last good checkpoint is kept in "
                                f"{checkpoints} (lower --learning-rate or use --mixed-precision bf16)")
        done = step + 1
        values = {k: accelerator.reduce(torch.tensor(v, device=device), reduction="mean").item()
                  for k, v in values.items()}
        rate = cfg.batch_size * per_step * accelerator.num_processes / (time.perf_counter() - began)
        bar.update(1)
        bar.set_postfix(kl=f"{values['kl']:.4f}", aux=f"{values['aux_loss']:.3f}")
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
            append_metrics(metrics_path, {"step": done, **values, "lr": schedules[0].get_last_lr()[0],
                                          "grad_norm": float(student_norm), "aux_grad_norm": float(aux_norm),
                                          "samples_per_s": rate, "epoch": epoch,
                                          "processes": accelerator.num_processes})
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            accelerator.wait_for_everyone()
            lora = bool(cfg.lora_rank)
            weights = (trainable_state(unwrapped, lora) if lora else accelerator.get_state_dict(student),
                       trainable_state(accelerator.unwrap_model(aux), lora) if lora else accelerator.get_state_dict(aux))
            if accelerator.is_main_process:
                save_checkpoint(checkpoints, done,
                                lambda folder: _write_checkpoint(folder, weights, (opt_student, opt_aux), schedules,
                                                                 ema),
                                {"seed": cfg.seed, "max_steps": cfg.max_steps}, cfg.keep_checkpoints)
        if cfg.validation_every and cfg.validation_prompts and done % cfg.validation_every == 0:
            if accelerator.is_main_process:
                validation_grid(pipe, unwrapped, student_params, ema, cfg.validation_prompts, resolution, cfg.seed,
                                device, cfg.out / "validation" / f"step-{done}.png", one_step=cfg.sampling_plan())
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_student(pipe, unwrapped, student_params, ema, cfg)
    accelerator.end_training()
    return cfg.out


def _forward_kl(log_t: torch.Tensor, log_a: torch.Tensor) -> float:
    """Mean KL(p_teacher || p_aux) per re-masked position: how far the student's images are from the teacher's."""
    return float((log_t.exp() * (log_t - log_a)).sum(-1).mean()) if len(log_t) else 0.0


def _write_checkpoint(folder: Path, weights, optimizers, schedules, ema) -> None:
    for name, state in zip(("student", "aux"), weights):
        save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")
    for name, optimizer, schedule in zip(("student", "aux"), optimizers, schedules):
        torch.save(optimizer.state_dict(), folder / f"{name}_optimizer.pt")
        torch.save(schedule.state_dict(), folder / f"{name}_lr_scheduler.pt")
    if ema is not None:
        torch.save(ema.state_dict(), folder / "ema.pt")


def _load_checkpoint(path: Path, cfg: DistillConfig, models: _Models, optimizers, schedules, ema) -> int:
    state = read_state(path)
    if not (path / "student.safetensors").is_file():
        raise TrainingError(f"--resume {str(path)!r} is not a distillation checkpoint (no student.safetensors)")
    for name, model in (("student", models.student), ("aux", models.aux)):
        load_trainable_state(model, load_file(path / f"{name}.safetensors"), bool(cfg.lora_rank))
    for name, optimizer, schedule in zip(("student", "aux"), optimizers, schedules):
        optimizer.load_state_dict(torch.load(path / f"{name}_optimizer.pt", weights_only=True))
        schedule.load_state_dict(torch.load(path / f"{name}_lr_scheduler.pt", weights_only=True))
    if ema is not None and (path / "ema.pt").is_file():
        ema.load_state_dict(torch.load(path / "ema.pt", weights_only=True))
    return int(state["step"])


def _save_student(pipe: MeissonicPipeline, student, params, ema, cfg: DistillConfig) -> None:
    """The student (its EMA weights when kept): a whole pipeline folder that samples in one step, or with LoRA an
    adapter folder (`lora/`) for the teacher that records the one-step mode."""
    plan = cfg.sampling_plan()
    with EmaWeights(ema, params):
        if cfg.lora_rank:
            folder = cfg.out / "lora"
            student.save_lora_adapter(folder)
            (folder / "base_model.json").write_text(json.dumps({"base_model": cfg.model}) + "\n")
            (folder / "one_step.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        else:
            pipe.transformer = student
            pipe.defaults = {**pipe.defaults, "resolution": cfg.resolution or pipe.defaults["resolution"]}
            pipe.set_one_step_mode(plan)  # samples in one step, by default at the size it learnt
            pipe.save_pretrained(cfg.out)
