"""scripts/swap_text_states.py: each part swaps exactly the text states it names, and nothing else."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from swap_text_states import swapped  # noqa: E402

from meissonic.text import encode_prompts  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipe():
    from meissonic.presets import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.mark.parametrize("part, positions, pooled_swapped", [
    ("none", [], False),
    ("shape", [4], False),                 # <bos> a large green [star] on the left , ...
    ("words", list(range(5, 13)), False),  # "on the left , on a white background"
    ("pads", list(range(13, 77)), False),  # the end token and the padding after it
    ("after", list(range(4, 77)), False),
    ("pooled", [], True),
])
@pytest.mark.exact
def test_each_part_swaps_only_its_states(tiny_pipe, part, positions, pooled_swapped):
    prompt = "a large green star on the left, on a white background"
    hidden, pooled = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [prompt])
    new_pooled, new_hidden = swapped(tiny_pipe, prompt, "green", "star", part)
    assert (new_hidden != hidden).any(-1)[0].nonzero().flatten().tolist() == positions
    assert bool((new_pooled != pooled).any()) == pooled_swapped
    if positions:  # the swapped states are the donor prompt's ("blue star")
        donor, _ = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [prompt.replace("green", "blue")])
        assert (new_hidden[0, positions] == donor[0, positions]).all()


@pytest.mark.exact
def test_analogy_is_the_sum_of_three_trained_pairs(tiny_pipe):
    prompt = "a large green star on the left, on a white background"
    new_pooled, new_hidden = swapped(tiny_pipe, prompt, "green", "star", "analogy")
    # green star = green circle - blue circle + blue star (circle: the first shape seen with both colours)
    terms = [encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [prompt.replace("green star", pair)])
             for pair in ("green circle", "blue circle", "blue star")]
    assert torch.equal(new_hidden, terms[0][0] - terms[1][0] + terms[2][0])
    assert torch.equal(new_pooled, terms[0][1] - terms[1][1] + terms[2][1])
    hidden, _ = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [prompt])
    assert not torch.allclose(new_hidden, hidden)  # a tiny random encoder is far from additive
