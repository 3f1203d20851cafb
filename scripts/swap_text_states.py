"""Where does a model read a held-out object's colour and shape from? Swap text states and judge the images.

For each held-out scene of `meissonic eval shapes` (same prompts and seeds), the prompt is encoded twice: as asked
("a large green star ...") and with the held-out colour replaced by a donor colour seen with that shape ("a large blue
star ..."). Some of the asked prompt's text-encoder states are then replaced by the donor's, and the image is judged
against the asked scene. If a part carries the colour, swapping it makes the object come out in the donor colour
("nothing" of the asked colour); if a part were the cause of the wrong shapes, swapping it would raise "pair right".

    python scripts/swap_text_states.py [--model M] [--num 50] [--parts none shape after words pads pooled analogy]
                                       [--category held-out|single]

Parts: `shape` the shape word's state; `after` every state after the colour word; `words` the words after the shape
word up to the end token; `pads` the end token and the padding after it; `pooled` the pooled vector; `none` nothing
(reproduces `eval shapes`' held-out row). `analogy` replaces every state and the pooled vector by sums of trained
pairs' encodings, H(green circle) - H(blue circle) + H(blue star) for "green star": the unseen pair as a sum of known
parts. If the transformer drew the pair from such states, only the text encoder would stand in the way; run with
`--category single` (trained pairs built the same way) to check that such sums are states the transformer can read.
"""

from __future__ import annotations

import argparse

import torch

from meissonic import MeissonicPipeline
from meissonic.evaluate import held_out_pairs, prompt_set
from meissonic.judge import judge
from meissonic.shapes import HELD_OUT, SHAPES
from meissonic.text import encode_prompts, text_length, tokenize

DONOR = {"green": "blue", "orange": "red", "purple": "blue", "yellow": "red"}  # seen with every shape
PARTS = ("none", "shape", "after", "words", "pads", "pooled", "analogy")


def donor_colour(colour: str) -> str:
    """A colour seen with every shape, other than `colour`."""
    return DONOR.get(colour, "red" if colour == "blue" else "blue")


def analogy(pipe, prompt: str, colour: str, shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, hidden) of `prompt` as H(colour other) - H(donor other) + H(donor shape), every pair a trained one."""
    donor = donor_colour(colour)
    other = next(s for s in SHAPES if s != shape and {(colour, s), (donor, s)}.isdisjoint(HELD_OUT))
    terms = [encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt.replace(f"{colour} {shape}", f"{c} {s}", 1)])
             for c, s in ((colour, other), (donor, other), (donor, shape))]
    (h1, p1), (h2, p2), (h3, p3) = terms
    return p1 - p2 + p3, h1 - h2 + h3


def swapped(pipe, prompt: str, colour: str, shape: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, hidden) of `prompt` with `part` taken from the donor prompt."""
    if part == "analogy":
        return analogy(pipe, prompt, colour, shape)
    donor = prompt.replace(f"{colour} {shape}", f"{donor_colour(colour)} {shape}", 1)
    # one prompt per call, as the pipeline encodes them: in a batch of two the states differ in the last bits
    hidden, pooled = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
    donor_hidden, donor_pooled = encode_prompts(pipe.tokenizer, pipe.text_encoder, [donor])
    length = text_length(pipe.text_encoder)
    ids, donor_ids = tokenize(pipe.tokenizer, [prompt], length)[0], tokenize(pipe.tokenizer, [donor], length)[0]
    differ = (ids != donor_ids).nonzero().flatten().tolist()
    if len(differ) != 1:
        raise ValueError(f"{prompt!r} and {donor!r} differ in {len(differ)} tokens, not one")
    shape_at = differ[0] + 1
    end = int((ids == pipe.tokenizer.eos_token_id).nonzero()[0])
    hidden = hidden.clone()
    span = {"shape": slice(shape_at, shape_at + 1), "after": slice(shape_at, None), "words": slice(shape_at + 1, end),
            "pads": slice(end, None)}.get(part)
    if span is not None:
        hidden[0, span] = donor_hidden[0, span]
    return (donor_pooled if part == "pooled" else pooled), hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped demo model)")
    parser.add_argument("--num", type=int, default=50, help="held-out scenes (eval shapes' --num)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--category", choices=("held-out", "single"), default="held-out",
                        help="which scenes of eval shapes (single: trained pairs, as a control)")
    args = parser.parse_args()
    from meissonic.loading import demo_model_folder

    pipe = MeissonicPipeline.from_pretrained(args.model or demo_model_folder(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    everything = prompt_set(args.num, args.seed)
    scenes = [(i, s) for i, (c, s) in enumerate(everything) if c == args.category]
    for part in args.parts:
        rows = []
        for index, scene in scenes:
            prompt, wanted = scene.caption(), scene.objects[0]
            pipe.prompt_cache.clear()
            pipe.prompt_cache[prompt] = swapped(pipe, prompt, wanted.colour, wanted.shape, part)
            image = pipe(prompt=prompt, guidance_scale=args.guidance,
                         generator=torch.Generator().manual_seed(args.seed + index)).images[0]
            # tallied per pair as eval shapes' held-out row (the first object is the pair asked about), whatever the
            # category
            rows.append({"category": "held-out", **judge(scene, image), "held_out": f"{wanted.colour} {wanted.shape}"})
        fully = sum(bool(r["fully_right"]) for r in rows) / len(rows)
        pairs = held_out_pairs(rows)
        nothing = sum(p["instead"].get("nothing", 0) for p in pairs.values())
        right = sum(p["pair_right"] * p["n"] for p in pairs.values())
        print(f"{part:7s} {args.category} fully right {fully:6.1%}  pair right {right / len(rows):6.1%}  "
              f"asked colour missing {nothing / len(rows):6.1%}", flush=True)


if __name__ == "__main__":
    main()
