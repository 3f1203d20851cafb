"""CUDA-graph readiness, checked on CPU: the transformer's per-step call compiles as one graph, once per size; the
sampling step compiles whole, with nothing that waits for the device; the static path draws the default's tokens."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from meissonic.presets import build_pipeline
from meissonic.runtime import compile_transformer, is_compiled
from meissonic.sampler import decode, sampling_step

MASK = 10
VOCAB = 10
# Graph nodes that would wait for the device or give a data-dependent shape, were any traced into a step ("to": the
# step moves nothing between devices, so any `.to` is suspect; `.to("cpu")` is traced as a plain `to`)
SYNCING = {"item", "tolist", "cpu", "to", "nonzero", "masked_select", "_local_scalar_dense", "repeat_interleave"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean torch.compile state per test, and one thread: these tensors are tiny, and two OpenMP threads on a busy
    2-core machine spin against each other (a 64-step tiny generation: 0.2 s on one thread, 10 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


class Counting:
    """A torch.compile backend that runs each graph as traced (the eager backend) and keeps the graphs it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def targets(self) -> set[str]:
        return {str(getattr(n.target, "__name__", n.target)) for g in self.graphs for n in g.graph.nodes}


def transformer_inputs(transformer, grid=(16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    tokens = torch.randint(0, cfg.codebook_size, (2, *grid), generator=gen)
    tokens[torch.rand(2, *grid, generator=gen) < 0.4] = transformer.mask_token_id
    conditions = transformer.encode_conditions(
        torch.randn(2, 77, cfg.joint_attention_dim, generator=gen), torch.randn(2, cfg.pooled_projection_dim,
                                                                                generator=gen),
        torch.tensor([[128.0, 128, 0, 0, 6]]).expand(2, -1), grid)
    return tokens, torch.tensor([0.4, 0.6]), conditions


@pytest.mark.parametrize("preset", ["tiny", "tiny-nods"])
@torch.no_grad()
def test_predict_compiles_as_one_graph_without_breaks_and_gives_the_eager_logits(preset):
    """aot_eager traces through AOTAutograd as inductor does, then runs the same kernels: bit for bit. (Inductor
    itself: test_runtime.py, `test_the_compiled_transformer_gives_the_eager_logits`.)"""
    model = build_pipeline(preset, seed=1).transformer.eval()
    tokens, timestep, conditions = transformer_inputs(model)
    eager = model.predict(tokens, timestep, conditions)
    compiled = torch.compile(model.predict, fullgraph=True, dynamic=False, backend="aot_eager")
    assert torch.equal(compiled(tokens, timestep, conditions), eager)
    assert torch.equal(compiled(tokens, timestep * 0.5, conditions), model.predict(tokens, timestep * 0.5, conditions))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # a new timestep value is an input, not a recompilation


@torch.no_grad()
def test_a_compiled_transformer_keeps_the_masked_only_head_eager():
    model = build_pipeline("tiny", seed=1).transformer.eval()
    tokens, timestep, conditions = transformer_inputs(model)
    where = tokens == model.mask_token_id
    full = model.predict(tokens, timestep, conditions)
    backend = Counting()
    compile_transformer(model, backend=backend)
    compile_transformer(model, backend=backend)  # a second call does nothing
    part = model.predict(tokens, timestep, conditions, logits_for=where)  # (M, V), data-dependent: not compiled
    assert not backend.graphs
    torch.testing.assert_close(part, full.permute(0, 2, 3, 1)[where], rtol=1e-5, atol=1e-5)


@pytest.mark.exact
def test_a_64_step_generation_compiles_once_per_size_and_gives_the_eager_tokens():
    """Through the pipeline: a compiled transformer is asked for grid logits (fixed shapes) and the sampler takes its
    static path. One graph for 64 guided steps at 128 px, none more for a second call, one more for 64 px; the tokens
    are the uncompiled pipeline's (full head on every position vs masked rows only, then the same draws)."""
    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)

    def generate(size):
        return pipe("a red circle", height=size, width=size, num_inference_steps=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    eager = {size: generate(size) for size in (128, 64)}
    backend = Counting()
    compile_transformer(pipe.transformer, backend=backend)
    assert torch.equal(generate(128), eager[128])
    assert len(backend.graphs) == 1
    generate(128)
    assert len(backend.graphs) == 1
    assert torch.equal(generate(64), eager[64])
    assert len(backend.graphs) == 2
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2


def step_inputs(order, seed=0, batch=2, height=4, width=5):
    gen = torch.Generator().manual_seed(seed)
    seq_len = height * width
    sample = torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
    sample[torch.rand(batch, seq_len, generator=gen) < 0.7] = MASK
    inputs = dict(
        logits=torch.randn(batch, VOCAB, height, width, generator=gen) * 3,
        exponential=torch.empty(batch * seq_len, VOCAB).exponential_(generator=gen),
        target=torch.tensor([5.0, 3.0]),
    )
    if order == "halton":
        inputs["halton"] = -torch.randperm(batch * seq_len, generator=gen).reshape(batch, seq_len).float()
    else:
        inputs.update(uniform=torch.rand(batch, seq_len, generator=gen), temperature=torch.tensor(1.5))
    return sample, inputs


@pytest.mark.parametrize("order", ["confidence", "halton"])
@pytest.mark.parametrize("final", [False, True])
def test_the_sampling_step_compiles_whole_with_nothing_that_waits(order, final):
    """fullgraph=True fails on any graph break: `.item()`, `bool(tensor)`, boolean-mask indexing and `nonzero` all
    break the graph (data-dependent values or shapes). `.cpu()` would not, so the traced ops are read too."""
    sample, inputs = step_inputs(order)
    backend = Counting()
    step = torch.compile(sampling_step, fullgraph=True, dynamic=False, backend=backend)
    out, not_finite = step(sample, mask_token_id=MASK, final=final, **inputs)
    expected, _ = sampling_step(sample, mask_token_id=MASK, final=final, **inputs)
    assert torch.equal(out, expected) and not bool(not_finite)
    assert not counters["graph_break"] and len(backend.graphs) == 1
    assert not backend.targets() & SYNCING, backend.targets() & SYNCING
    assert ((out != MASK) | (sample == MASK)).all()  # known tokens stay


def random_logits(seed=0, scale=3.0):
    def fn(tokens, step):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        b, h, w = tokens.shape
        return scale * torch.randn(b, VOCAB, h, w, generator=g)

    return fn


@pytest.mark.exact
@pytest.mark.parametrize("order", ["confidence", "halton"])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("fast, method", [(True, "reference"), (False, "reference"), (True, "cdf")])
def test_static_decoding_draws_the_default_paths_tokens(order, per_image, fast, method, monkeypatch):
    """The same seed and logits give the same tokens, and leave the generators in the same state: the same noise for
    every row (the fast CPU stream, in chunks, or exponential_; or one uniform per row with draws="cdf"), the same
    softmax and pick per row."""
    from meissonic import draws

    monkeypatch.setattr(draws, "CHUNK_ROWS", 16)  # several chunks per generator
    monkeypatch.setattr(draws, "fast_cpu_stream", lambda: fast)
    tokens = torch.full((2, 6, 7), MASK)
    tokens[0, :2] = 3  # known tokens between masked ones
    for steps in (1, 5, 12):
        runs = []
        for static in (False, True):
            gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
            generator = gens if per_image else gens[0]
            runs.append((decode(tokens, random_logits(4), MASK, steps, generator=generator, order=order,
                                static=static, draws=method), [g.get_state() for g in gens]))
        (default, states), (static, static_states) = runs
        assert torch.equal(static, default) and (static[0, :2] == 3).all() and (static != MASK).all()
        assert all(torch.equal(a, b) for a, b in zip(states, static_states))


def test_static_decoding_refuses_compact_logits_and_reports_nan_after_the_loop():
    tokens = torch.full((2, 4, 4), MASK)
    with pytest.raises(ValueError, match=r"static=True needs grid logits .* got shape \(32, 10\)"):
        decode(tokens, lambda t, s: torch.zeros(32, VOCAB), MASK, 2, static=True)
    seen = []

    def nan_at_step_one(t, step):
        seen.append(step)
        return torch.full((2, VOCAB, 4, 4), float("nan") if step == 1 else 0.0)

    with pytest.raises(ValueError, match="nan or inf"):
        decode(tokens, nan_at_step_one, MASK, 3, static=True, generator=torch.Generator().manual_seed(0))
    assert seen == [0, 1, 2]  # flagged on the device at step 1, read once after the last step


def test_compile_refuses_fbgemms_packed_int8_linears():
    """Through `prepare`, as `--quantize int8-dynamic --compile` on a CPU in fp32 asks: a clear error, not a failure
    inside torch.compile on the first step. torchao's quantized weights (int8, fp8, int4) trace and are accepted."""
    from torch.ao.nn.quantized.dynamic import Linear as PackedLinear

    from meissonic.runtime import RunOptions, prepare

    pipe = build_pipeline("tiny", seed=0)
    pipe.quantize("int8-dynamic")
    if not any(isinstance(m, PackedLinear) for m in pipe.transformer.modules()):
        pytest.skip("this torch build has no fbgemm dynamic quantization (torchao's path was taken)")
    with pytest.raises(ValueError, match="int8-dynamic.*cannot trace"):
        compile_transformer(pipe.transformer, backend="eager")
    pipe = build_pipeline("tiny", seed=0)
    prepare(pipe, torch.device("cpu"), RunOptions(quantize="int8", compile=True))
    assert is_compiled(pipe.transformer)
