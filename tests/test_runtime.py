"""How a pipeline runs: masked-only output head, prompts encoded once and the text encoder released, precision
choice, process shares, batched and multi-process generation from the CLI, run-option errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic.cli import main
from meissonic.pipeline import MeissonicPipeline
from meissonic.presets import build_pipeline
from meissonic.runtime import (
    CPU_BF16_MIN_PARAMS,
    ProcessShare,
    auto_dtype,
    process_share,
    transformer_params,
)


@pytest.fixture(scope="module")
def pipe():
    p = build_pipeline("tiny", seed=3)
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(transformer, grid=(6, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    tokens = torch.randint(0, cfg.codebook_size, (2, *grid), generator=gen)
    tokens[torch.rand(2, *grid, generator=gen) < 0.4] = transformer.mask_token_id
    return dict(
        hidden_states=tokens,
        encoder_hidden_states=torch.randn(2, 77, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen),
        micro_conds=torch.tensor([[128.0, 128, 0, 0, 6]]).expand(2, -1),
        timestep=torch.tensor([0.4, 0.6]),
    )


def test_masked_only_head_gives_the_full_heads_rows_where_asked_compactly(pipe):
    inputs = _inputs(pipe.transformer)
    where = inputs["hidden_states"] == pipe.transformer.mask_token_id
    with torch.no_grad():
        full = pipe.transformer(**inputs)
        part = pipe.transformer(**inputs, logits_for=where)
    assert 0 < where.sum() < where.numel()
    assert part.shape == (where.sum(), full.shape[1])  # one row per position asked for, none for the others
    torch.testing.assert_close(part, full.permute(0, 2, 3, 1)[where], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [0.05, 0.6, 0.9, 1.0])
def test_the_head_as_matrix_products_gives_the_convolutions_logits(share):
    """TokenHead runs its two 1x1 convolutions as matrix products over positions (all, or those asked for): the
    logits of the reference's ConvMlmLayer (conv, RMSNorm, conv) within float32 rounding, at any share asked."""
    from meissonic.layers import TokenHead, channels_last_norm

    gen = torch.Generator().manual_seed(0)
    head = TokenHead(48, 100, 1e-6)
    with torch.no_grad():
        for weight in (head.conv1.weight, head.conv2.weight, head.layer_norm.weight):
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.2)
        x = torch.randn(2, 48, 7, 9, generator=gen)
        where = torch.rand(2, 7, 9, generator=gen) < share
        convolved = head.conv2(channels_last_norm(head.layer_norm, head.conv1(x)))  # (B, V, h, w)
        full, part = head(x), head(x, where)
    torch.testing.assert_close(full, convolved, rtol=1e-5, atol=1e-5)
    assert where.any() and part.shape == (where.sum(), 100)
    torch.testing.assert_close(part, convolved.permute(0, 2, 3, 1)[where], rtol=1e-5, atol=1e-5)
    if where.all():  # every position asked for: the full head's own rows, the same computation
        assert torch.equal(part, full.permute(0, 2, 3, 1).reshape(-1, 100))


def test_sampling_asks_the_masked_only_head_for_every_masked_token(pipe, monkeypatch):
    """At every step of a guided generation, the pipeline asks for the logits of exactly the masked tokens, and gets
    the full head's values there. Compared within float32 rounding, not bit for bit: the two heads are different
    kernels, whose last bits differ on some CPUs (and a last-bit difference can flip a near-tie token draw, so
    comparing the sampled tokens of two runs would depend on the CPU)."""
    forward, mask_id, steps = pipe.transformer.forward, pipe.transformer.mask_token_id, []

    def both_heads(*args, logits_for=None, **kwargs):
        part = forward(*args, logits_for=logits_for, **kwargs)
        full = forward(*args, **kwargs)
        masked = kwargs["hidden_states"] == mask_id
        assert torch.equal(logits_for, masked)  # (2B, h, w): both guidance branches, every masked token
        torch.testing.assert_close(part, full.permute(0, 2, 3, 1)[masked], rtol=1e-5, atol=1e-5)
        steps.append(int(masked.sum()))
        return part

    monkeypatch.setattr(pipe.transformer, "forward", both_heads)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pipe(prompt="a red circle", num_images_per_prompt=2, generator=gens, guidance_scale=3.0, output_type="latent")
    assert len(steps) == pipe.defaults["steps"] and steps[0] > steps[-1] > 0


@pytest.mark.exact
def test_prompts_encoded_once_then_the_text_encoder_released(tiny_folder, tmp_path):
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt=["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0),
                    output_type="latent").images

    live = [pipe.encode_prompt(p) for p in (["a red circle", "a blue square"], ["", ""])]  # as generation encodes
    prompts = ["a red circle", "a blue square", ""]
    pipe.encode_prompts_once(prompts, release=True)
    assert pipe.text_encoder is None
    # the cached embeddings are the encoder's own, within float32 rounding: encoded as one batch of three, whose
    # matrix products may round otherwise than the batches of two above on some CPUs
    cached_pooled, cached_hidden = pipe.encode_prompt(prompts)
    for (pooled, hidden), rows in zip(live, ([0, 1], [2, 2])):
        torch.testing.assert_close(cached_pooled[rows], pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached_hidden[rows], hidden, rtol=1e-5, atol=1e-6)
    given = pipe(prompt_embeds=cached_pooled[:2], encoder_hidden_states=cached_hidden[:2],
                 negative_prompt_embeds=cached_pooled[2:].expand(2, -1),
                 negative_encoder_hidden_states=cached_hidden[2:].expand(2, -1, -1),
                 generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(run(), given)  # generation reads the cache: exactly the images of those embeddings
    with pytest.raises(ValueError, match="'a green star' was not encoded before the text encoder was released"):
        pipe(prompt="a green star", output_type="latent")
    with pytest.raises(ValueError, match="text encoder was released"):
        pipe.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_auto_precision(monkeypatch, tiny_folder):
    import meissonic.runtime as runtime

    cpu = torch.device("cpu")
    small = transformer_params(tiny_folder)
    assert 0 < small < CPU_BF16_MIN_PARAMS
    assert auto_dtype(cpu, small) == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert auto_dtype(cpu, CPU_BF16_MIN_PARAMS) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(runtime, "available_memory", lambda: 64 * 2**30)
    assert auto_dtype(cpu, CPU_BF16_MIN_PARAMS) == torch.float32  # never fp16 on CPU, and no bf16 without hardware
    assert auto_dtype(cpu, None) == torch.float32
    # bf16 slower than fp32 here, but the 1B's fp32 generation (~8 GB) would not fit in 6 GB: bf16 halves it
    monkeypatch.setattr(runtime, "available_memory", lambda: 6 * 2**30)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert auto_dtype(cpu, 1_000_000_000) == torch.bfloat16
    assert auto_dtype(cpu, CPU_BF16_MIN_PARAMS) == torch.float32  # 0.8 GB fits
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert auto_dtype(cpu, 1_000_000_000) == torch.float32  # no bf16 instructions: emulated bf16 is no way out
    monkeypatch.setattr(runtime, "available_memory", lambda: None)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert auto_dtype(cpu, 1_000_000_000) == torch.float32  # memory unknown: speed alone decides


def test_available_memory_is_a_plausible_size():
    from meissonic.runtime import available_memory

    available = available_memory()
    assert available is not None and 2**26 < available < 2**50  # between 64 MiB and 1 PiB


def test_bf16_counts_as_fast_only_where_its_matmuls_are(monkeypatch):
    import meissonic.runtime as runtime

    def probe(native: bool, bf16_s: float, fp32_s: float = 1.0) -> bool:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(runtime, "matmul_seconds", lambda dtype: bf16_s if dtype == torch.bfloat16 else fp32_s)
        runtime.cpu_has_fast_bf16.cache_clear()
        try:
            return runtime.cpu_has_fast_bf16()
        finally:
            runtime.cpu_has_fast_bf16.cache_clear()

    assert probe(native=True, bf16_s=0.5)  # twice as fast
    assert not probe(native=True, bf16_s=1.19)  # AVX512-BF16 without AMX on some Xeons: slower than fp32
    assert not probe(native=True, bf16_s=0.9)  # faster, but by less than the margin
    assert not probe(native=False, bf16_s=0.1)  # no bf16 instructions: never, whatever a timing says


def test_the_matmul_probe_times_real_work_and_leaves_the_random_state_alone():
    from meissonic.runtime import matmul_seconds

    state = torch.random.get_rng_state()
    seconds = matmul_seconds(torch.float32, shape=(64, 128, 256), repeats=2)
    assert 0 < seconds < 5
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_1b_architecture_counts_as_large():
    from meissonic.presets import get_preset
    from meissonic.transformer import MeissonicTransformer

    with torch.device("meta"):
        model = MeissonicTransformer(**get_preset("meissonic").transformer)
    assert sum(p.numel() for p in model.parameters()) > 5 * CPU_BF16_MIN_PARAMS


def test_process_share_from_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert process_share() == ProcessShare(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    share = process_share()
    assert share.take(list(range(8))) == [1, 4, 7]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 and WORLD_SIZE=3"):
        process_share()


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def assert_the_same_images_to_rounding(made: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Images made with the same seeds but in other batches (or at another thread count) are the expected ones, not
    bit for bit: other batch sizes and thread counts round otherwise in the last bits, which on some CPUs can flip a
    near-tie token draw and redraw that token's patch. So every image must be far nearer the expected image of its
    own name than any other, and all but one must equal it to rounding."""
    assert made.keys() == expected.keys()
    names = sorted(expected)
    distance = {(a, b): np.abs(made[a].astype(int) - expected[b]).mean() for a in names for b in names}
    for name in names:
        assert distance[name, name] < min(distance[name, other] for other in names if other != name) / 4, name
    assert sum(distance[name, name] < 1.0 for name in names) >= len(names) - 1, distance


PROMPTS = ["a red circle", "a blue square on the left", "a small green star", "a purple diamond"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def one_by_one(tiny_folder, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(["generate", "--prompts-file", str(prompts_file), "--model", str(tiny_folder), "--seed", "7",
                 "--num-images", "2", "--out", str(out)]) == 0
    return _images(out)


def test_batched_prompts_give_the_images_of_one_by_one(tiny_folder, prompts_file, one_by_one, tmp_path):
    assert len(one_by_one) == 8
    assert main(["generate", "--prompts-file", str(prompts_file), "--model", str(tiny_folder), "--seed", "7",
                 "--num-images", "2", "--batch-size", "3", "--release-text-encoder", "--out", str(tmp_path)]) == 0
    assert_the_same_images_to_rounding(_images(tmp_path), one_by_one)


@pytest.mark.exact
def test_ranks_write_their_share_and_together_the_whole(tiny_folder, prompts_file, one_by_one, tmp_path,
                                                        monkeypatch):
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        out = tmp_path / f"rank{rank}"
        assert main(["generate", "--prompts-file", str(prompts_file), "--model", str(tiny_folder), "--seed", "7",
                     "--num-images", "2", "--out", str(out)]) == 0
        assert len(_images(out)) == 4  # two prompts of four, two images each
    together = {**_images(tmp_path / "rank0"), **_images(tmp_path / "rank1")}
    assert together.keys() == one_by_one.keys()
    for name, image in together.items():
        assert np.array_equal(image, one_by_one[name]), name


@pytest.mark.slow
def test_torchrun_two_processes_split_a_prompts_file(tiny_folder, prompts_file, one_by_one, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "meissonic", "generate", "--prompts-file",
                           str(prompts_file), "--model", str(tiny_folder), "--seed", "7", "--num-images", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_the_same_images_to_rounding(_images(tmp_path), one_by_one)


@pytest.mark.parametrize("argv, message", [
    (["--offload"], "needs a CUDA GPU"),
    (["--offload", "sequential"], "needs a CUDA GPU"),
    (["--quantize-text-encoder"], "--quantize-text-encoder needs --quantize"),
    (["--vq-tile", "2"], "--vq-tile 2: must be at least 4"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16 on CPU"),
])
def test_run_option_errors_are_one_line(tiny_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", str(tiny_folder), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_quantized_and_tiled_generation_from_the_cli(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", str(tiny_folder), "--seed", "1", "--quantize", "int8",
                 "--vq-tile", "4", "--out", str(out)]) == 0
    (path,) = out.glob("*.png")
    image = Image.open(path)
    assert image.size == (128, 128)
    assert '"quantize": "int8"' in image.info["parameters"]


def test_the_compiled_transformer_gives_the_eager_logits(pipe):
    """`predict` compiled whole by inductor (fullgraph: it fails on any graph break). Inductor fuses the norms, softmax
    and matmul epilogues and sums in its own order: the same logits to float32 rounding, not bit for bit."""
    import torch._dynamo

    from meissonic.runtime import compile_transformer, is_compiled

    model = build_pipeline("tiny", seed=3).transformer.eval()
    inputs = _inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs)
        compile_transformer(model)
        compiled = model(**inputs)
    torch._dynamo.reset()
    assert is_compiled(model) and not is_compiled(pipe.transformer)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_quantized_copy_loads_quantized_in_its_precision_and_generates(tiny_folder, tmp_path):
    copy = tmp_path / "tiny-int8"
    assert main(["convert", "--model", str(tiny_folder), "--out", str(copy), "--dtype", "bf16",
                 "--quantize", "int8"]) == 0
    assert (copy / "transformer" / "quantization.json").is_file()
    pipe = MeissonicPipeline.from_pretrained(copy)  # no dtype: the one it was quantized in, for every part
    assert pipe.quantization == {"transformer": "int8", "text_encoder": "none"}
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vqvae.dtype == torch.bfloat16
    from meissonic.quantize import weight_bytes

    plain = MeissonicPipeline.from_pretrained(tiny_folder, torch_dtype=torch.bfloat16)
    assert weight_bytes(pipe.transformer) < weight_bytes(plain.transformer)
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", str(copy), "--seed", "0", "--out", str(out)]) == 0
    (path,) = out.glob("*.png")
    assert '"dtype": "bfloat16"' in Image.open(path).info["parameters"]
    with pytest.raises(ValueError, match="loads only in it"):
        MeissonicPipeline.from_pretrained(copy, torch_dtype=torch.float32)


def test_convert_refuses_fp16_quantization_on_cpu(tiny_folder, tmp_path, capsys):
    assert main(["convert", "--model", str(tiny_folder), "--out", str(tmp_path / "x"), "--dtype", "fp16",
                 "--quantize", "int8"]) == 2
    assert "GPU-only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_cuda_gives_the_images_of_plain_cuda(tiny_folder, offload):
    from meissonic.runtime import RunOptions, prepare

    def run(options):
        pipe = MeissonicPipeline.from_pretrained(tiny_folder)
        prepare(pipe, torch.device("cuda"), options)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", generator=torch.Generator("cuda").manual_seed(0), output_type="np").images

    np.testing.assert_allclose(run(RunOptions(offload=offload)), run(RunOptions()), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_quantized_generation_on_cuda(tiny_folder, method):
    from meissonic.runtime import RunOptions, prepare

    pipe = MeissonicPipeline.from_pretrained(tiny_folder, torch_dtype=torch.bfloat16)
    prepare(pipe, torch.device("cuda"), RunOptions(quantize=method))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt="a red circle", num_inference_steps=4, output_type="np").images
    assert np.isfinite(images).all() and images.shape == (1, 128, 128, 3)
