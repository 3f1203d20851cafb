"""Text-to-image with Meissonic: load the released folder layout, encode the prompt, run the sampler, decode tokens.

`MeissonicPipeline.__call__` takes the reference pipeline's arguments, so scripts written for it run unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, VQModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .loading import (
    DEMO,
    HUB_OPTIONS,
    STUDENT_FILE,
    WEIGHTS,
    ModelFolderError,
    check_config_fields,
    check_config_matches_weights,
    own_memory,
    resolve_model_folder,
    student_folder,
    weights_are_pickle,
)
from .one_step import OneStep, draw_tokens, student_inputs
from .orders import ORDERS
from .runtime import is_compiled
from .sampler import MASK_SCHEDULES, decode, guided_logits, masked_count
from .speeds import sampling_settings
from .sizes import LargeSizeWarning, SizePolicy, check_request, first_step_message, size_limit
from .step_cache import CachePlan, ModulationCache, StepCache
from .text import encode_prompts, save_tokenizer
from .transformer import ConditionCache, MeissonicTransformer
from .version import __version__
from .vq import decode_tokens, downscale_factor, speed_up_decoding

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# model_index.json as released, so folders we write load wherever a released one does.
RELEASED_MODEL_INDEX = {
    "_class_name": "Pipeline",
    "scheduler": ["scheduler", "Scheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["src.transformer", "Transformer2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}
COMPONENTS = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")


class MeissonicScheduler(ConfigMixin):
    """The `scheduler/` component: which id is the mask and which mask schedule sampling follows.

    The sampling itself is the pure function `meissonic.sampler.decode`; this only carries the saved settings.
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, mask_token_id: int = 8255, masking_schedule: str = "cosine"):
        if masking_schedule not in MASK_SCHEDULES:
            raise ValueError(f"masking_schedule={masking_schedule!r} is not one of {sorted(MASK_SCHEDULES)}")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MeissonicScheduler:
        return cls.from_config(cls.load_config(str(folder)))


class MeissonicPipeline(DiffusionPipeline):
    """Meissonic text-to-image. Components: `transformer`, `vqvae`, `text_encoder`, `tokenizer`, `scheduler`."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"

    def __init__(
        self,
        vqvae: VQModel,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        transformer: MeissonicTransformer,
        scheduler: MeissonicScheduler,
        defaults: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self.defaults = _sampling_defaults(transformer, defaults)
        self.last_work: dict = {}  # the last call's transformer work (see `__call__`)
        self.vq_tile: int | None = None  # decode images in tiles of this many tokens a side (None: whole)
        self.size_policy = SizePolicy()  # large sizes and memory-hungry requests: warned about (`meissonic.sizes`)
        self.prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see `encode_prompts_once`
        self.vae_scale_factor = downscale_factor(vqvae)
        # channels-last convolutions, folded upsamplers, in-place resnets: the demo's decode 30 -> 15 ms on a CPU,
        # the same images to float32 rounding
        speed_up_decoding(vqvae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False)

    @property
    def _execution_device(self) -> torch.device:
        """Where the models run. diffusers finds it by looking for offload hooks in every module of every component
        (about 2 ms a call on the demo); components that carry no hook at their top (no accelerate offload, no group
        offloading) run where the transformer's weights are."""
        models = [m for m in (self.transformer, self.text_encoder, self.vqvae) if isinstance(m, torch.nn.Module)]
        weight = next(self.transformer.parameters(), None) if self.transformer is not None else None
        if weight is None or any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in models):
            return super()._execution_device
        return weight.device

    # ------------------------------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        variant: str | None = None,
        allow_pickle: bool = False,
        **components,
    ) -> MeissonicPipeline:
        """Load a folder (or Hugging Face repo id) in the released layout.

        Weights are read from safetensors; a component with only pickle files (`.bin`, `.pt`, `.ckpt`) is refused
        unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)`. No code from the folder runs.

        `torch_dtype` is the precision of every loaded part (float32 when not given, whatever the files hold).
        `variant="fp16"` picks the released half-precision files; `cache_dir`, `token`, `local_files_only` and
        `force_download` go to the hub download. A component passed by name replaces the folder's,
        e.g. `text_encoder=CLIPTextModelWithProjection.from_pretrained(...)` for the encoder the reference scripts use;
        `transformer` may also be the path of a transformer folder in the released layout (a Di[M]O student, whose
        tokenizer, text encoder and VQ come from its teacher's folder), checked and loaded as the folder's own.
        A student folder (`meissonic.loading.student_folder`; `"demo-1step"`, the shipped one) loads its teacher's
        folder with its transformer, and samples in one step.
        """
        student = student_folder(pretrained_model_name_or_path) if "transformer" not in components else None
        if student is not None:  # a student folder: its teacher's folder with the student's transformer
            spec = json.loads((student / STUDENT_FILE).read_text())
            base = spec.get("base_model")
            if not isinstance(base, str) or not base:
                raise ModelFolderError(f"{str(student / STUDENT_FILE)!r} names no base_model")
            if base != DEMO and not Path(base).is_absolute() and (student / base).exists():
                base = str(student / base)  # a base folder given relative to the student folder
            pipe = cls.from_pretrained(base, torch_dtype, revision, variant, allow_pickle,
                                       transformer=student / "transformer", **components)
            pipe.set_one_step_mode(OneStep.from_dict(spec.get("one_step") or {}))
            return pipe
        hub = {k: components.pop(k) for k in HUB_OPTIONS if k in components}
        if isinstance(components.get("transformer"), (str, os.PathLike)):  # a transformer folder (e.g. a student)
            components["transformer"] = _load_transformer_folder(Path(components["transformer"]), torch_dtype,
                                                                 allow_pickle, variant)
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)}; components are {', '.join(COMPONENTS)}, "
                             f"hub options {', '.join(HUB_OPTIONS)}")
        folder = resolve_model_folder(pretrained_model_name_or_path, revision=revision, variant=variant, **hub)
        index = json.loads((folder / "model_index.json").read_text())
        from .quantize import is_quantized_folder, load_quantized, saved_dtype

        quantized = "transformer" not in components and is_quantized_folder(folder / "transformer")
        # safetensors only, unless the caller allows a component's pickle files (read with weights_only=True)
        weights = {name: {"use_safetensors": not weights_are_pickle(folder / name, allow_pickle), "variant": variant}
                   for name in WEIGHTS if name not in components and not (name == "transformer" and quantized)}
        _check_before_loading(folder, weights, variant)
        # no dtype given: float32 for every part, whatever the files hold (diffusers' models upcast on their own,
        # transformers' keep the file's half precision: a half-precision folder would load mixed and fail); a
        # quantized transformer only loads in the precision it was quantized in, so then that one
        if torch_dtype is None:
            torch_dtype = saved_dtype(folder / "transformer") if quantized else torch.float32

        def text_encoder():
            model = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **weights["text_encoder"])
            return model.to(torch_dtype)

        def transformer():
            if quantized:
                return load_quantized(folder / "transformer", dtype=torch_dtype)
            return MeissonicTransformer.from_pretrained(folder / "transformer", **weights["transformer"],
                                                        torch_dtype=torch_dtype)

        loaders = {
            "vqvae": lambda: VQModel.from_pretrained(folder / "vqvae", **weights["vqvae"], torch_dtype=torch_dtype),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            "text_encoder": text_encoder,
            "transformer": transformer,
            "scheduler": lambda: MeissonicScheduler.from_pretrained(folder / "scheduler"),
        }
        parts = {name: components[name] if name in components else load() for name, load in loaders.items()}
        for model in (parts[name] for name in WEIGHTS if parts[name] is not None):
            own_memory(model)  # loaded weights out of the files' memory maps (loading.owned says why)
        pipe = cls(**parts, defaults=index.get("_meissonic_defaults"))
        check_components(pipe)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **unused) -> None:
        """Write the released layout: `model_index.json` plus one sub-folder per component."""
        if self.text_encoder is None:
            raise ValueError("the text encoder was released: a pipeline without it cannot be saved")
        if self.quantization and self.quantization["text_encoder"] != "none":
            raise ValueError("a quantized text encoder cannot be saved: quantize only the transformer to save")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.quantization:  # quantized weights and the method, which loading re-applies (see quantize.py)
            from .quantize import save_quantized

            save_quantized(self.transformer, out / "transformer", self.quantization["transformer"])
        else:
            self.transformer.save_pretrained(out / "transformer")
        self.vqvae.save_pretrained(out / "vqvae")
        self.text_encoder.save_pretrained(out / "text_encoder")
        save_tokenizer(self.tokenizer, out / "tokenizer")
        self.scheduler.save_config(out / "scheduler")
        index = dict(RELEASED_MODEL_INDEX, _meissonic_version=__version__, _meissonic_defaults=self.defaults)
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def load_lora(self, folder: str | os.PathLike, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Add a LoRA adapter written by `meissonic train --lora-rank` (`pytorch_lora_weights.safetensors`), or a
        student's by `meissonic distill --lora-rank` (its `one_step.json` makes the pipeline sample in one step)."""
        path = Path(folder)
        if not (path / "pytorch_lora_weights.safetensors").is_file():
            raise ModelFolderError(f"{str(path)!r} holds no pytorch_lora_weights.safetensors")
        self.transformer.load_lora_adapter(
            path, prefix=None, adapter_name=adapter_name, weight_name="pytorch_lora_weights.safetensors"
        )
        self.transformer.set_adapters([adapter_name], weights=[scale])
        if (path / "one_step.json").is_file():  # a one-step student distilled as LoRA (`meissonic distill`)
            self.set_one_step_mode(OneStep.from_dict(json.loads((path / "one_step.json").read_text())))
        if (path / "text_encoder_lora" / "adapter_config.json").is_file():  # the run also had text-encoder LoRA
            from peft import PeftModel

            wrapped = PeftModel.from_pretrained(self.text_encoder, str(path / "text_encoder_lora"))
            self.text_encoder = wrapped.merge_and_unload()  # merged at full strength
        text_encoder = path / "text_encoder"
        if text_encoder.is_dir():  # the run also trained the whole text encoder
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(text_encoder).to(
                self.text_encoder.device, self.text_encoder.dtype)
        for model in (self.transformer, self.text_encoder):  # the adapters' weights, out of their memory maps
            if model is not None:
                own_memory(model)
        self.prompt_cache.clear()  # embeddings of the old text encoder

    # ------------------------------------------------------------------------------------------ generation

    def encode_prompt(
        self, prompts: list[str], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (pooled `prompt_embeds` (B, P), `encoder_hidden_states` (B, 77, C)).

        Prompts encoded by `encode_prompts_once` come from its cache; the others need the text encoder."""
        device = device or self._execution_device
        if all(p in self.prompt_cache for p in prompts):
            pooled = torch.cat([self.prompt_cache[p][0] for p in prompts])
            hidden = torch.cat([self.prompt_cache[p][1] for p in prompts])
        elif self.text_encoder is None:
            missing = [p for p in prompts if p not in self.prompt_cache]
            raise ValueError(f"prompt {missing[0]!r} was not encoded before the text encoder was released: pass every "
                             f"prompt (and negative prompt) to encode_prompts_once first")
        else:
            hidden, pooled = encode_prompts(self.tokenizer, self.text_encoder, prompts)
        return pooled.to(device), hidden.to(device)

    def encode_prompts_once(self, prompts: Sequence[str], release: bool = False, batch_size: int = 32) -> None:
        """Encode these prompts now and keep their embeddings, so generation reuses them; with `release`, then
        drop the text encoder (its memory is freed before sampling; prompts not encoded here fail clearly)."""
        if self.text_encoder is None:
            raise ValueError("the text encoder was released already")
        todo = list(dict.fromkeys(p for p in prompts if p not in self.prompt_cache))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            hidden, pooled = encode_prompts(self.tokenizer, self.text_encoder, chunk)
            for i, prompt in enumerate(chunk):
                self.prompt_cache[prompt] = (pooled[i:i + 1], hidden[i:i + 1])
        if release:
            self.release_text_encoder()

    def release_text_encoder(self) -> None:
        """Free the text encoder's memory; only prompts in `prompt_cache` can be used afterwards."""
        from .runtime import release_freed_memory

        on_cuda = self.text_encoder is not None and self.text_encoder.device.type == "cuda"
        self.text_encoder = None
        release_freed_memory()
        if on_cuda:
            torch.cuda.empty_cache()

    def enable_vq_tiling(self, tile: int | None = 32) -> None:
        """Decode images in overlapping tiles of `tile` tokens a side (blended, no seams): less memory for large
        images. None decodes whole."""
        self.vq_tile = tile

    def quantize(self, method: str, text_encoder: bool = False) -> None:
        """Quantize the transformer's weights (and the text encoder's with `text_encoder`) in place, with
        `meissonic.quantize.quantize` (none, int8, fp8, int4). Call after moving the pipeline to its device."""
        from .quantize import quantize

        quantize(self.transformer, method)
        if text_encoder and self.text_encoder is not None:
            quantize(self.text_encoder, method)

    @property
    def quantization(self) -> dict | None:
        """{"transformer": method, "text_encoder": method} when either is quantized (read from the models, which
        `quantize` and `load_quantized` mark), else None."""
        from .quantize import quantization_method

        methods = {"transformer": quantization_method(self.transformer),
                   "text_encoder": "none" if self.text_encoder is None else quantization_method(self.text_encoder)}
        return None if set(methods.values()) == {"none"} else methods

    @property
    def max_side(self) -> int:
        """The longest side made without being asked twice (`meissonic.sizes`): twice the resolution the model was
        trained for. Larger sizes work, as far as memory goes, but cost the square of the side and draw poorly."""
        return size_limit(self)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless (height, width) is an image size this model can make."""
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"{name}={value!r} must be a positive multiple of {f} (the tokenizer's patch size)")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        micro_conditioning_aesthetic_score: float = 6,
        micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
        temperature: float | tuple[float, float] = (2, 0),
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        masking_schedule: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_ramp: bool = False,
        order: str = "confidence",
        step_cache: CachePlan | None = None,
        speed: str | None = None,
        one_step: OneStep | bool | None = None,
        draws: str | None = None,
    ):
        """Generate images; returns `ImagePipelineOutput` (`.images`) or a 1-tuple when `return_dict=False`.

        Arguments as the reference pipeline; unset `height`, `width`, `num_inference_steps` and `guidance_scale` take
        the model's defaults (`self.defaults`: 1024 px and 64 steps for Meissonic, 512 px and 48 steps for Monetico,
        guidance 9 for both). `generator` may be a list, one per image. `latents` is an initial token
        grid (B, h, w) with the mask id where unknown. `callback_on_step_end(pipe, step, timestep, {"latents": ...})`
        may return {"latents": tokens} to replace the grid. `masking_schedule` overrides the scheduler's.

        Fewer passes (off by default): `guidance_interval=(start, end)` guides only the steps whose share of the steps
        done before them lies in [start, end); the others run the conditional branch alone, one pass instead of two.
        `guidance_ramp=True` scales guidance by the share of tokens already known, `1 + (scale - 1) * known` (MUSE,
        MAR): the first step of a generation then runs unguided. `order="halton"` keeps the drawn tokens in a Halton
        order instead of by confidence (see `meissonic.orders`). `step_cache=CachePlan(...)` runs full passes on
        refresh steps only and partial passes between (see `meissonic.step_cache`). `draws="cdf"` draws each masked
        token from one uniform by inverse CDF instead of the reference's stream (same distribution, another stream,
        far fewer random numbers; `meissonic.draws`). `speed="exact"|"fast"|"fastest"`
        picks a measured combination of these (`meissonic.speeds`); knobs given beside a level replace its values.

        `self.last_work` holds the transformer work of the call per image in full-pass equivalents (`passes`: a guided
        full step 2, an unguided one 1, a partial pass its share of the sequence a full pass runs, text included) and,
        with a step cache, the full and partial pass counts and the caches' peak bytes.

        One step (`meissonic.one_step`): `one_step=True` (or a `OneStep` with its settings) samples a Di[M]O student
        as its authors do: random ids with a fixed share masked, embedding noise, one pass without guidance, one
        draw per position; steps, guidance and the fewer-passes knobs do not apply. A folder that records a one-step
        mode (a student this project wrote) samples that way unless `one_step=False`.
        """
        height = self.defaults["resolution"] if height is None else height
        width = self.defaults["resolution"] if width is None else width
        num_inference_steps = self.defaults["steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = self.defaults["guidance"] if guidance_scale is None else guidance_scale
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
        plan = self._one_step_plan(one_step)
        if plan is not None:
            if latents is not None:
                raise ValueError("one-step sampling starts from random ids: edits use the multi-step sampler "
                                 "(one_step=False)")
            if (speed is not None or step_cache is not None or guidance_interval is not None or guidance_ramp
                    or draws is not None):
                raise ValueError("one-step sampling runs one pass without guidance: speed, step_cache, "
                                 "guidance_interval, guidance_ramp and draws do not apply")
            self.check_size(height, width)
            device = self._execution_device  # once: diffusers finds it by walking every module
            check_request(self, width, height, _images(prompt, prompt_embeds, None, num_images_per_prompt),
                          guided=False, device=device)
            tokens = self._one_step(plan, prompt, prompt_embeds, encoder_hidden_states, num_images_per_prompt,
                                    (height, width), generator, micro_conditioning_crop_coord,
                                    micro_conditioning_aesthetic_score, callback_on_step_end, device)
            return self._output(tokens, output_type, return_dict)
        settings = sampling_settings(speed, guidance_interval=guidance_interval, guidance_ramp=guidance_ramp,
                                     order=order, step_cache=step_cache, masking_schedule=masking_schedule,
                                     draws=draws)
        guidance_interval, guidance_ramp, order = (settings[k] for k in ("guidance_interval", "guidance_ramp", "order"))
        step_cache, masking_schedule, draws = settings["step_cache"], settings["masking_schedule"], settings["draws"]
        if step_cache is not None and is_compiled(self.transformer):
            raise ValueError("step caching runs partial passes whose shapes change every step: it cannot run on a "
                             "compiled transformer (use speed='exact' with compile)")
        guided_steps = guidance_steps(num_inference_steps, guidance_interval)
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {', '.join(ORDERS)}")
        if latents is not None:
            height, width = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        self.check_size(height, width)
        device = self._execution_device  # once: diffusers finds it by walking every module
        large = check_request(self, width, height, _images(prompt, prompt_embeds, latents, num_images_per_prompt),
                              guided=guidance_scale > 1, cached=step_cache is not None, device=device).large
        pooled, hidden = self._conditioning(
            prompt, negative_prompt, prompt_embeds, encoder_hidden_states,
            negative_prompt_embeds, negative_encoder_hidden_states, num_images_per_prompt, guidance_scale, device,
        )  # (B or 2B, P), (B or 2B, 77, C): negatives first when guiding
        use_cfg = guidance_scale > 1.0
        batch = pooled.shape[0] // 2 if use_cfg else pooled.shape[0]
        grid = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        tokens = self._initial_tokens(latents, batch, grid, device)  # (B, h, w)

        micro = [width, height, micro_conditioning_crop_coord[0], micro_conditioning_crop_coord[1]]
        micro_conds = torch.tensor(micro + [micro_conditioning_aesthetic_score], device=device, dtype=torch.float32)
        micro_conds = micro_conds[None].expand(pooled.shape[0], -1)  # (B or 2B, 5)
        cache = ConditionCache()
        convention = self.transformer.config.get("mask_rate_conditioning", "step_index")
        mask_id = self.scheduler.config.mask_token_id

        cond_cache = ConditionCache()  # for the steps outside the guidance interval: the conditional half alone
        static = is_compiled(self.transformer)  # compiled: the full head's grid logits and a static step, fixed shapes
        block = self.transformer.block_grid(*grid)
        cached = StepCache(step_cache, num_inference_steps, grid, block) if step_cache is not None else None
        schedule = masking_schedule or self.scheduler.config.masking_schedule
        modulations = None  # with the step cache, the blocks' modulations are computed for several steps at once
        if cached is not None:
            modulations = ModulationCache(expected_timesteps(tokens == mask_id, num_inference_steps, schedule,
                                                             convention))
        work = {"passes": 0.0}  # transformer work per image, in full-pass equivalents

        def run(sample, masked, timestep, guided, **extra):
            """One transformer call: both branches (negatives first) when `guided`, else the conditional one."""
            if modulations is not None:
                extra["modulations"] = modulations
            if not guided:
                return self.transformer(
                    hidden_states=sample, encoder_hidden_states=hidden[-batch:], pooled_projections=pooled[-batch:],
                    micro_conds=micro_conds[-batch:], timestep=timestep, cache=cond_cache if use_cfg else cache,
                    logits_for=None if static else masked, **extra)  # the conditional branch alone
            if timestep.numel() > 1:
                timestep = torch.cat([timestep, timestep])
            extra = {k: torch.cat([v, v]) if k == "rows" else v for k, v in extra.items()}
            return self.transformer(
                hidden_states=torch.cat([sample, sample]), encoder_hidden_states=hidden, pooled_projections=pooled,
                micro_conds=micro_conds, timestep=timestep, cache=cache,
                logits_for=None if static else torch.cat([masked, masked]),  # the sampler reads masked rows only
                **extra)  # rows of the masked positions, image by image: both halves hold the same grid

        def logits_fn(sample: torch.Tensor, step: int) -> torch.Tensor:
            masked = sample == mask_id
            masked_share = masked.flatten(1).float().mean(1)  # (B,)
            if convention == "step_index":  # the reference: remaining step index N-1..0, one value for the batch
                timestep = torch.tensor([num_inference_steps - 1 - step], device=device)
            else:  # share of tokens still masked, per image
                timestep = masked_share
            scale = guidance_scale
            if use_cfg and guidance_ramp:  # per image, by the share of tokens already known
                scale = 1 + (guidance_scale - 1) * (1 - masked_share)  # (B,)
            guide = use_cfg and guided_steps[step] and not (guidance_ramp and bool((scale == 1).all()))
            if cached is not None and not cached.is_full(step, guide, masked):
                return partial_step(sample, masked, timestep, scale, guide)
            kv = {} if cached is None else {"kv": cached.kv}
            logits = run(sample, masked, timestep, guide, **kv)  # (M, V), or (2M, V) when guiding
            work["passes"] += 2 if guide else 1
            if not guide:
                if cached is not None:
                    cached.store(sample, masked, logits, None)
                return logits
            uncond, cond = logits.chunk(2)  # both halves of the batch hold the same grid, so the same rows
            if isinstance(scale, torch.Tensor) and static:  # one scale per image, over its grid
                scale = scale[:, None, None, None].to(logits.dtype)
            elif isinstance(scale, torch.Tensor):  # one scale per image, repeated over its masked rows
                scale = scale.repeat_interleave(masked.flatten(1).sum(1))[:, None].to(logits.dtype)
            if cached is None:
                return guided_logits(uncond, cond, scale, overwrite=True)  # the logits are ours
            diff = cond - uncond
            guided = uncond + scale * diff  # = guided_logits(uncond, cond, scale)
            cached.store(sample, masked, guided, diff)
            return guided

        def partial_step(sample, masked, timestep, scale, guide):
            rows = cached.choose(sample, masked)  # (B, S) on the block grid
            both = guide and step_cache.guidance == "both"
            positions, fresh = run(sample, masked, timestep, both, kv=cached.kv, rows=rows)  # (K,), (K, V)
            branches = 2 if both else 1
            if both:
                positions, (uncond, cond) = positions[:positions.numel() // 2], fresh.chunk(2)
                fresh = uncond + _row_scale(scale, positions, masked) * (cond - uncond)
            elif guide:  # the unconditional branch = conditional - the difference stored at the last full pass
                fresh = fresh + (_row_scale(scale, positions, masked) - 1) * cached.diff[positions].to(fresh.dtype)
            # a full pass runs text + image positions through the blocks, a partial one the subset alone
            work["passes"] += branches * rows.shape[1] / (block[0] * block[1] + hidden.shape[1])
            return cached.merge(sample, masked, rows, positions, fresh)

        progress = self.progress_bar(total=num_inference_steps)

        started = time.perf_counter()

        def on_step(step: int, sample: torch.Tensor) -> torch.Tensor | None:
            progress.update()
            if large and step == 0:  # a large size: say what a step costs, so that the user can stop early
                warnings.warn(first_step_message(time.perf_counter() - started, num_inference_steps),
                              LargeSizeWarning, stacklevel=2)
            timestep = num_inference_steps - 1 - step
            if callback is not None and step % callback_steps == 0:
                callback(step, timestep, sample)
            if callback_on_step_end is not None:
                names = {"latents": sample}
                out = callback_on_step_end(self, step, timestep, {k: names[k] for k in callback_on_step_end_tensor_inputs})
                return (out or {}).get("latents")
            return None

        with progress:
            if (tokens == mask_id).any():  # else nothing to draw: an edit that keeps every token
                tokens = decode(
                    tokens,
                    logits_fn,
                    mask_token_id=mask_id,
                    num_steps=num_inference_steps,
                    schedule=schedule,
                    temperature=temperature,
                    generator=generator,
                    on_step=on_step,
                    order=order,
                    static=static,
                    draws=draws,
                )

        self.last_work = dict(work)
        if cached is not None:
            self.last_work.update(full=cached.full_passes, partial=cached.partial_passes, cache_bytes=cached.nbytes())
        return self._output(tokens, output_type, return_dict)

    def _output(self, tokens: torch.Tensor, output_type: str, return_dict: bool):
        if output_type == "latent":
            output = tokens
        else:
            images = decode_tokens(self.vqvae, tokens, tile=self.vq_tile)  # (B, 3, H, W) in [0, 1]
            output = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(output) if return_dict else (output,)

    def maybe_free_model_hooks(self) -> None:
        """diffusers' end-of-call step (reset stateful model hooks, offload again after `enable_model_cpu_offload`)
        without its walk over `self.components`, which inspects `__init__`'s signature (0.4 ms a call on the demo):
        the models are our three, and only where offload hooks exist does diffusers' own step run."""
        for model in (self.transformer, self.text_encoder, self.vqvae):
            if hasattr(model, "_reset_stateful_cache"):
                model._reset_stateful_cache()
        if getattr(self, "_all_hooks", None):
            super().maybe_free_model_hooks()

    # ------------------------------------------------------------------------------------------ one step

    @property
    def one_step_mode(self) -> OneStep | None:
        """The one-step settings this folder records (a student), else None."""
        saved = self.defaults.get("one_step")
        return None if saved is None else OneStep.from_dict(saved)

    def set_one_step_mode(self, plan: OneStep | None) -> None:
        """Record (or, with None, forget) a one-step mode; `save_pretrained` writes it with the folder."""
        self.defaults = {k: v for k, v in self.defaults.items() if k != "one_step"}
        if plan is not None:
            self.defaults["one_step"] = plan.to_dict()

    def _one_step_plan(self, one_step) -> OneStep | None:
        if one_step is None:
            return self.one_step_mode
        if isinstance(one_step, OneStep):
            return one_step
        if isinstance(one_step, bool):
            return (self.one_step_mode or OneStep()) if one_step else None
        raise ValueError(f"one_step={one_step!r} must be True, False, None or a meissonic.one_step.OneStep")

    def _one_step(self, plan: OneStep, prompt, prompt_embeds, encoder_hidden_states, num_images: int,
                  size: tuple[int, int], generator, crop, score, callback_on_step_end, device) -> torch.Tensor:
        """One pass of a student, sampled as `meissonic.one_step` describes; returns the tokens (B, h, w)."""
        pooled, hidden = self._conditioning(prompt, None, prompt_embeds, encoder_hidden_states, None, None,
                                            num_images, 1.0, device)  # no guidance: the conditional branch alone
        batch = pooled.shape[0]
        generators = per_image_generators(generator, batch, device)
        grid = (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
        config = self.transformer.config
        ids, noise = student_inputs(plan, generators, grid, config.codebook_size, self.scheduler.config.mask_token_id,
                                    config.num_attention_heads * config.attention_head_dim, device)
        micro = torch.tensor([size[1], size[0], crop[0], crop[1], score], device=device, dtype=torch.float32)
        progress = self.progress_bar(total=1)
        with progress:
            logits = self.transformer(hidden_states=ids, encoder_hidden_states=hidden, pooled_projections=pooled,
                                      micro_conds=micro[None].expand(batch, -1),
                                      timestep=torch.tensor([plan.condition], device=device), embedding_noise=noise)
            tokens = draw_tokens(logits, plan, generators)  # every position's draw, masked and known alike
            progress.update()
        if callback_on_step_end is not None:
            out = callback_on_step_end(self, 0, 0, {"latents": tokens})
            tokens = (out or {}).get("latents", tokens)
        self.last_work = {"passes": 1.0}
        return tokens

    def _conditioning(
        self, prompt, negative_prompt, prompt_embeds, encoder_hidden_states,
        negative_prompt_embeds, negative_encoder_hidden_states, num_images, guidance_scale, device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (prompt_embeds is None) != (encoder_hidden_states is None):
            raise ValueError("pass both prompt_embeds and encoder_hidden_states, or neither")
        if (negative_prompt_embeds is None) != (negative_encoder_hidden_states is None):
            raise ValueError("pass both negative_prompt_embeds and negative_encoder_hidden_states, or neither")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt or prompt_embeds")
        if prompt is not None:
            prompt_embeds, encoder_hidden_states = self.encode_prompt(prompt_list(prompt), device)
        n_prompts = prompt_embeds.shape[0]
        pooled = prompt_embeds.to(device).repeat(num_images, 1)  # (B, P) ordered as the reference: all prompts, again
        hidden = encoder_hidden_states.to(device).repeat(num_images, 1, 1)  # (B, 77, C)
        if guidance_scale <= 1.0:
            return pooled, hidden
        if negative_prompt_embeds is None:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * n_prompts if isinstance(negatives, str) else list(negatives)
            if len(negatives) != n_prompts:
                raise ValueError(f"got {len(negatives)} negative prompts for {n_prompts} prompts")
            negative_prompt_embeds, negative_encoder_hidden_states = self.encode_prompt(negatives, device)
        neg_pooled = negative_prompt_embeds.to(device).expand(n_prompts, -1).repeat(num_images, 1)
        neg_hidden = negative_encoder_hidden_states.to(device).expand(n_prompts, -1, -1).repeat(num_images, 1, 1)
        return torch.cat([neg_pooled, pooled]), torch.cat([neg_hidden, hidden])

    def _initial_tokens(self, latents, batch: int, grid: tuple[int, int], device) -> torch.Tensor:
        mask_id = self.scheduler.config.mask_token_id
        if latents is None:
            return torch.full((batch, *grid), mask_id, dtype=torch.long, device=device)
        latents = torch.as_tensor(latents, device=device).long()
        latents = latents.reshape(-1, *grid)
        if latents.shape[0] not in (1, batch):
            raise ValueError(f"latents hold {latents.shape[0]} grids for {batch} images")
        return latents.expand(batch, -1, -1).clone()


def _row_scale(scale, positions: torch.Tensor, masked: torch.Tensor):
    """The guidance scale of each fresh row: a number, or per image (a ramp) picked by the row's image."""
    if not isinstance(scale, torch.Tensor):
        return scale
    return scale[positions // masked[0].numel()][:, None]


def expected_timesteps(masked: torch.Tensor, steps: int, schedule: str, convention: str) -> list[torch.Tensor]:
    """The mask-rate condition each step will pass, as `logits_fn` computes it, if no callback changes the grid:
    the remaining step index, or each image's share of masked tokens as the sampler's schedule leaves it."""
    if convention == "step_index":
        return [torch.tensor([steps - 1 - step], device=masked.device) for step in range(steps)]
    seq_len = masked[0].numel()
    unknown = masked.flatten(1).sum(1)  # (B,) masked at the start of the step
    start_ratio = unknown.float() / seq_len
    out = []
    for step in range(steps):
        out.append(unknown.float() / seq_len)
        target = masked_count(seq_len, start_ratio, step, steps, schedule).to(unknown.device).long()
        unknown = torch.where(unknown > 0, torch.minimum(unknown - 1, target).clamp(min=1), 0)  # as `_remask`
    return out


def guidance_steps(steps: int, interval: tuple[float, float] | None) -> list[bool]:
    """Which of `steps` steps are guided: those whose share of the steps done before them lies in [start, end)."""
    if interval is None:
        return [True] * steps
    try:
        start, end = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval={interval!r}: give (start, end), shares of the steps") from None
    if not 0 <= start < end <= 1:
        raise ValueError(f"guidance_interval={interval!r}: needs 0 <= start < end <= 1 (shares of the steps)")
    return [start <= step / steps < end for step in range(steps)]


def per_image_generators(generator, count: int, device="cpu", error: type[ValueError] = ValueError
                         ) -> list[torch.Generator]:
    """One generator per image: the list given, the one given for every image in turn, or a fresh random one (on
    `device`); a list of another length raises `error`."""
    if generator is None:
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    if isinstance(generator, torch.Generator):
        return [generator] * count
    generator = list(generator)
    if len(generator) != count:
        raise error(f"got {len(generator)} generators for {count} images: pass one per image, or a single one")
    return generator


def _images(prompt, prompt_embeds, latents, per_prompt: int) -> int:
    """Images a call makes, known before any work."""
    if prompt_embeds is not None:
        images = prompt_embeds.shape[0] * per_prompt
    else:
        images = (1 if isinstance(prompt, str) or prompt is None else len(prompt)) * per_prompt
    return max(images, 0 if latents is None else latents.shape[0])


def prompt_list(prompt: str | list[str], error: type[ValueError] = ValueError) -> list[str]:
    """A prompt or a list of them -> a non-empty list of strings, else `error` naming the value."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise error(f"prompt={prompt!r} must be a string or a non-empty list of strings")
    return prompts


def _check_before_loading(folder: Path, weights: dict, variant: str | None, paths: dict | None = None) -> None:
    """Refuse unknown transformer/vqvae config fields and configs that contradict their weights, before allocating.
    A component's folder is `folder / name` unless `paths` names another."""
    import inspect

    from transformers import CLIPTextConfig

    where = {name: (paths or {}).get(name, folder / name) for name in weights}
    builders = {
        "transformer": lambda: MeissonicTransformer.from_config(config),
        "vqvae": lambda: VQModel.from_config(VQModel.load_config(str(where["vqvae"]))),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(where["text_encoder"])),
    }
    if "transformer" in weights:
        accepted = set(inspect.signature(MeissonicTransformer.__init__).parameters) - {"self"}
        config = check_config_fields(where["transformer"], accepted)
    if "vqvae" in weights:  # the text encoder's config is transformers' own, with many optional fields: not checked
        check_config_fields(where["vqvae"], set(inspect.signature(VQModel.__init__).parameters) - {"self"})
    for name, options in weights.items():
        if options["use_safetensors"]:
            check_config_matches_weights(where[name], builders[name], variant)


def _load_transformer_folder(path: Path, torch_dtype, allow_pickle: bool, variant: str | None):
    """A transformer folder in the released layout (config.json + weights), checked as a pipeline folder's is."""
    from .quantize import is_quantized_folder, load_quantized, saved_dtype

    if not (path / "config.json").is_file():
        raise ModelFolderError(f"transformer {str(path)!r} is not a transformer folder: it has no config.json")
    if is_quantized_folder(path):
        return load_quantized(path, dtype=torch_dtype or saved_dtype(path))
    options = {"use_safetensors": not weights_are_pickle(path, allow_pickle), "variant": variant}
    _check_before_loading(path.parent, {"transformer": options}, variant, {"transformer": path})
    return MeissonicTransformer.from_pretrained(path, **options, torch_dtype=torch_dtype or torch.float32)


def _sampling_defaults(transformer: MeissonicTransformer, saved: dict | None) -> dict:
    """Resolution, steps and guidance a model is meant for: as saved by us, else the released scripts' choice."""
    guidance = float((saved or {}).get("guidance", 9.0))  # the reference scripts' guidance scale
    if saved:
        defaults = {"resolution": int(saved["resolution"]), "steps": int(saved["steps"]), "guidance": guidance}
        if saved.get("one_step") is not None:  # a one-step student (`meissonic.one_step`)
            defaults["one_step"] = OneStep.from_dict(saved["one_step"]).to_dict()
        return defaults
    if transformer.config.downsample:  # Meissonic: 1024 px, 64 steps (inference.py)
        return {"resolution": 1024, "steps": 64, "guidance": guidance}
    return {"resolution": 512, "steps": 48, "guidance": guidance}  # Monetico: 512 px, 48 steps


def check_components(pipe: MeissonicPipeline) -> None:
    """Refuse components that do not fit together, naming the fields, before any generation."""
    t, vq, te = pipe.transformer.config, pipe.vqvae.config, pipe.text_encoder.config
    pairs = [
        ("transformer codebook_size", t.codebook_size, "vqvae num_vq_embeddings", vq.num_vq_embeddings),
        ("transformer joint_attention_dim", t.joint_attention_dim, "text_encoder hidden_size", te.hidden_size),
        ("transformer pooled_projection_dim", t.pooled_projection_dim, "text_encoder projection_dim",
         te.projection_dim),
        ("scheduler mask_token_id", pipe.scheduler.config.mask_token_id, "transformer vocab_size - 1",
         t.vocab_size - 1),
    ]
    for name_a, a, name_b, b in pairs:
        if a != b:
            raise ModelFolderError(f"{name_a}={a} does not match {name_b}={b}")
