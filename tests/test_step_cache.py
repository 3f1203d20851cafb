"""Step caching (`meissonic.step_cache`) and speed levels (`meissonic.speeds`): the partial pass's maths, the plan,
the pipeline's accounting, and the knobs' errors. The edit guarantees at every level are in test_edit.py."""

import numpy as np
import pytest
import torch

from meissonic.cli import main
from meissonic.pipeline import MeissonicPipeline
from meissonic.speeds import LEVELS, SPEEDS, sampling_settings
from meissonic.step_cache import CachePlan, KVReuse, ModulationCache, StepCache, covered_tokens
from meissonic.transformer import ConditionCache, MeissonicTransformer


def small_transformer(compressed: bool) -> MeissonicTransformer:
    torch.manual_seed(0)
    return MeissonicTransformer(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), vocab_size=65, codebook_size=64,
        downsample=compressed, upsample=compressed).eval()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("grid", [(6, 6), (5, 7)])
def test_a_partial_pass_on_unchanged_tokens_gives_the_full_pass_logits(compressed, grid):
    """Right after a full pass on the same tokens, every cached key and value is what the partial pass would compute
    itself, so the subset's logits are the full pass's (to float32 rounding: the subset's products run on fewer rows,
    and the decompression runs as a product instead of a transposed conv)."""
    model = small_transformer(compressed)
    batch = 2
    ids = torch.randint(0, 65, (batch, *grid), generator=torch.Generator().manual_seed(1))
    text, pooled, micro = torch.randn(batch, 7, 24), torch.randn(batch, 32), torch.rand(batch, 5)
    kv, cache = KVReuse(), ConditionCache()
    rows_n = model.block_grid(*grid)[0] * model.block_grid(*grid)[1]
    rows = torch.stack([torch.randperm(rows_n)[:3].sort().values for _ in range(batch)])
    wanted = torch.rand(batch, *grid) < 0.7
    with torch.no_grad():
        full = model(ids, text, pooled, torch.tensor([0.5]), micro_conds=micro, cache=cache, kv=kv)  # (B, V, h, w)
        assert len(kv.layers) == 3  # one per attention layer
        positions, logits = model(ids, text, pooled, torch.tensor([0.5]), micro_conds=micro, cache=cache, kv=kv,
                                  rows=rows, logits_for=wanted)
    covered = covered_tokens(rows, model.block_grid(*grid)[1], grid, compressed)
    expected = sorted(int(b * grid[0] * grid[1] + t) for b in range(batch) for t in covered[b].tolist()
                      if t >= 0 and wanted.flatten(1)[b, t])
    assert sorted(positions.tolist()) == expected and len(expected) > 0
    reference = full.permute(0, 2, 3, 1).reshape(-1, 64)[positions]
    torch.testing.assert_close(logits, reference, atol=2e-6, rtol=1e-5)


def test_covered_tokens_with_compression_crop_odd_grids():
    rows = torch.tensor([[0, 3]])  # block grid 2 x 2 of a 3 x 3 token grid
    assert covered_tokens(rows, 2, (3, 3), True).tolist() == [[0, 1, 3, 4, 8, -1, -1, -1]]
    assert covered_tokens(rows, 2, (3, 3), False).tolist() == [[0, 3]]


def test_plan_refresh_steps_and_checks():
    assert CachePlan(warmup=0.25, every=3).full_steps(8) == [True, True, True, False, False, True, False, False]
    assert CachePlan(warmup=0, every=1).full_steps(4) == [True] * 4
    assert CachePlan(share=0.25).subset_size(64) == 16 and CachePlan(share=0.01).subset_size(16) == 1
    for bad, message in [({"warmup": 1.5}, "warmup=1.5"), ({"every": 0}, "every=0"), ({"share": 0}, "share=0"),
                         ({"guidance": "half"}, "guidance='half'")]:
        with pytest.raises(ValueError, match=message):
            CachePlan(**bad)


def test_the_subset_takes_changed_tokens_first():
    cache = StepCache(CachePlan(share=0.25), 8, (4, 4), (4, 4))
    tokens = torch.full((1, 4, 4), 9)
    masked = tokens == 9
    rows = torch.randn(16, 5)
    cache.store(tokens, masked, rows, None)
    tokens = tokens.clone()
    tokens[0, 3, 3] = 1  # decoded since the full pass
    chosen = cache.choose(tokens, tokens == 9)
    assert chosen.shape == (1, 4) and 15 in chosen[0].tolist()


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens_of(pipe, seed=0, **kwargs):
    return pipe("a red square", generator=torch.Generator().manual_seed(seed), num_inference_steps=8,
                guidance_scale=3.0, output_type="latent", **kwargs).images


@pytest.mark.exact
def test_refreshing_every_step_is_the_exact_sampler(pipe, monkeypatch):
    """Bit for bit once the modulation cache computes one step at a time (as each pass does: the same product on
    the same rows); with its default window the products run on more rows, equal only to rounding (next test)."""
    monkeypatch.setattr(ModulationCache, "ROWS", 1)
    exact = tokens_of(pipe)
    assert pipe.last_work == {"passes": 16.0}
    assert torch.equal(tokens_of(pipe, step_cache=CachePlan(warmup=0, every=1)), exact)
    assert pipe.last_work["partial"] == 0 and pipe.last_work["full"] == 8


@pytest.mark.parametrize("convention", ["step_index", "mask_rate"])
def test_the_modulation_cache_computes_several_steps_in_one_product_and_gives_each_call_its_own(convention):
    """A window of steps in one product per layer; each call gets the modulations of its own timestep and rows (the
    logits equal the per-call ones to float32 rounding); a timestep outside the schedule is computed for itself."""
    torch.manual_seed(0)
    model = MeissonicTransformer(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                                 vocab_size=65, codebook_size=64, mask_rate_conditioning=convention).eval()
    ids = torch.randint(0, 65, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    inputs = dict(encoder_hidden_states=torch.randn(2, 7, 24), pooled_projections=torch.randn(2, 32),
                  micro_conds=torch.rand(2, 5))
    if convention == "step_index":
        schedule = [torch.tensor([float(5 - step)]) for step in range(6)]
    else:
        schedule = [torch.tensor([1.0 - step / 8, 0.9 - step / 8]) for step in range(6)]
    window = ModulationCache(schedule)
    cache = ConditionCache()
    with torch.no_grad():
        for timestep in [*schedule, schedule[0] / 3]:  # the last one is not in the schedule
            expected = model(ids, timestep=timestep, cache=ConditionCache(), **inputs)
            ours = model(ids, timestep=timestep, cache=cache, modulations=window, **inputs)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert window.products == 2  # the six steps in one window (6 x 2 rows <= ROWS), then the stray timestep


def test_a_cached_generation_reads_the_modulation_weights_a_few_times(pipe, monkeypatch):
    from meissonic.layers import Modulations

    calls = []
    compute = Modulations.compute
    monkeypatch.setattr(Modulations, "compute", staticmethod(lambda layers, temb: calls.append(len(temb)) or
                                                             compute(layers, temb)))
    tokens_of(pipe, speed="fast")  # 8 steps: unguided and guided passes, full and partial
    assert 1 <= len(calls) <= 2 and pipe.last_work["full"] + pipe.last_work["partial"] == 8


def test_cached_runs_count_their_work(pipe):
    tokens = tokens_of(pipe, step_cache=CachePlan(warmup=0.25, every=3, share=0.5))
    work = pipe.last_work
    # steps 0, 1 (warm-up), 2 and 5 full and guided; 3, 4, 6, 7 one branch on 8 of the 16 block positions (128 px:
    # 8 x 8 tokens, 4 x 4 after the compression), a full pass running those 16 and the 77 text positions
    share = 8 / (16 + 77)
    assert work["full"] == 4 and work["partial"] == 4 and work["passes"] == pytest.approx(4 * 2 + 4 * share)
    assert work["cache_bytes"] > 0 and not (tokens == pipe.scheduler.config.mask_token_id).any()
    tokens_of(pipe, step_cache=CachePlan(warmup=0.25, every=3, share=0.5, guidance="both"))
    assert pipe.last_work["passes"] == pytest.approx(4 * 2 + 4 * 2 * share)


@pytest.mark.parametrize("speed", SPEEDS)
def test_every_level_fills_the_grid_and_costs_less(pipe, speed):
    tokens = tokens_of(pipe, speed=speed)
    assert not (tokens == pipe.scheduler.config.mask_token_id).any()
    assert pipe.last_work["passes"] <= 16.0
    assert (pipe.last_work["passes"] < 12.0) == (speed != "exact")


def test_cache_with_ramp_halton_and_a_batch_of_generators(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = pipe(["a", "b", "c"], generator=gens, num_inference_steps=6, guidance_scale=3.0, output_type="latent",
               guidance_ramp=True, order="halton", step_cache=CachePlan(warmup=0, every=3, share=0.5)).images
    assert out.shape[0] == 3 and not (out == pipe.scheduler.config.mask_token_id).any()
    again = pipe(["a", "b", "c"], generator=[torch.Generator().manual_seed(i) for i in range(3)],
                 num_inference_steps=6, guidance_scale=3.0, output_type="latent", guidance_ramp=True, order="halton",
                 step_cache=CachePlan(warmup=0, every=3, share=0.5)).images
    assert torch.equal(out, again)  # seeds reproduce


def test_a_callback_that_re_masks_tokens_forces_a_full_pass(pipe):
    mask_id = pipe.scheduler.config.mask_token_id

    def remask(pipe_, step, timestep, tensors):
        latents = tensors["latents"].clone()
        if step == 3:
            latents[:, 0, :] = mask_id  # positions the last full pass saw decoded
        return {"latents": latents}

    out = pipe("x", generator=torch.Generator().manual_seed(0), num_inference_steps=8, guidance_scale=3.0,
               output_type="latent", callback_on_step_end=remask,
               step_cache=CachePlan(warmup=0, every=8, share=0.25)).images
    assert not (out == mask_id).any()
    assert pipe.last_work["full"] == 2  # step 0 as planned, step 4 forced by the re-masked tokens


def test_speed_settings():
    assert sampling_settings(None)["step_cache"] is None and sampling_settings("exact") == sampling_settings(None)
    fast = sampling_settings("fast")
    assert fast["step_cache"] == LEVELS["fast"]["step_cache"] and fast["guidance_interval"] is not None
    mine = CachePlan(every=2)
    assert sampling_settings("fast", step_cache=mine, order="halton")["step_cache"] is mine  # a knob wins
    with pytest.raises(ValueError, match="speed='exact' is the reference sampler and cannot take guidance_ramp"):
        sampling_settings("exact", guidance_ramp=True)
    with pytest.raises(ValueError, match="speed='quick' is not one of exact, fast, fastest"):
        sampling_settings("quick")
    assert sampling_settings(None)["draws"] == "reference" and fast["draws"] == "cdf"
    assert sampling_settings("fastest", draws="reference")["draws"] == "reference"
    with pytest.raises(ValueError, match="cannot take draws"):
        sampling_settings("exact", draws="cdf")


def test_a_compiled_transformer_refuses_the_cache(pipe):
    pipe.transformer._meissonic_compiled = True
    try:
        with pytest.raises(ValueError, match="cannot run on a compiled transformer"):
            tokens_of(pipe, speed="fast")
    finally:
        del pipe.transformer._meissonic_compiled


@pytest.mark.parametrize("argv, message", [
    (["--speed", "exact", "--order", "halton"], "--speed exact: speed='exact' is the reference sampler"),
    (["--step-cache", "0.3", "2.5", "0.2"], "EVERY must be a whole number of steps"),
    (["--step-cache", "0.3", "2", "1.5"], "share=1.5 must lie in (0, 1]"),
    (["--speed", "fast", "--compile"], "--compile runs fixed shapes"),
    (["--speed", "turbo"], "invalid choice: 'turbo'"),
    (["--speed", "exact", "--draws", "cdf"], "cannot take draws"),
    (["--draws", "gumbel"], "invalid choice: 'gumbel'"),
])
def test_cli_refuses_bad_speed_options(capsys, tiny_folder, tmp_path, argv, message):
    try:
        code = main(["generate", "x", "--model", str(tiny_folder), "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # argparse prints its usage first
    assert not (tmp_path / "o").exists()


def test_cli_speed_is_recorded_in_the_png(tiny_folder, tmp_path):
    import json

    from PIL import Image

    assert main(["generate", "x", "--model", str(tiny_folder), "--out", str(tmp_path), "--steps", "4",
                 "--speed", "fastest", "--seed", "3"]) == 0

    params = json.loads(Image.open(next(tmp_path.glob("*.png"))).info["parameters"])
    assert params["speed"] == "fastest" and params["step_cache"]["every"] == LEVELS["fastest"]["step_cache"].every
    assert params["guidance_interval"] == list(LEVELS["fastest"]["guidance_interval"]) and params["draws"] == "cdf"
    assert np.asarray(Image.open(next(tmp_path.glob("*.png")))).shape[-1] == 3


@pytest.mark.parametrize("variant", ["bf16", "int8", "lora"])
def test_caching_runs_in_other_precisions_quantized_and_with_lora(tiny_folder, variant):
    """A partial pass uses the model's own modules (quantized, LoRA-wrapped), so right after a full pass on the same
    tokens it still gives that pass's logits; and a whole cached generation fills the grid."""
    from peft import LoraConfig

    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    pipe = MeissonicPipeline.from_pretrained(tiny_folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if variant == "int8":
        pipe.quantize("int8")
    if variant == "lora":
        pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"],
                                                init_lora_weights=False))
    out = pipe("x", generator=torch.Generator().manual_seed(0), num_inference_steps=6, guidance_scale=3.0,
               output_type="latent", speed="fast").images
    assert pipe.last_work["partial"] > 0 and not (out == pipe.scheduler.config.mask_token_id).any()
    model = pipe.transformer
    grid = (4, 6)
    ids = torch.randint(0, 64, (1, *grid), generator=torch.Generator().manual_seed(2))
    text, pooled = torch.randn(1, 77, 32).to(dtype), torch.randn(1, 32).to(dtype)
    kv, cache, micro = KVReuse(), ConditionCache(), torch.tensor([[128.0, 128, 0, 0, 6]])
    with torch.no_grad():
        full = model(ids, text, pooled, torch.tensor([0.3]), micro_conds=micro, cache=cache, kv=kv)
        positions, logits = model(ids, text, pooled, torch.tensor([0.3]), micro_conds=micro, cache=cache, kv=kv,
                                  rows=torch.tensor([[1, 4]]))
    reference = full.permute(0, 2, 3, 1).reshape(-1, 64)[positions].float()
    # bf16: the subset's products run on other row counts, so other kernel blockings round differently
    tolerance = {"atol": 0.05, "rtol": 0.02} if variant == "bf16" else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(logits.float(), reference, **tolerance)
