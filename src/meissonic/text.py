"""Text conditioning: CLIP tokenizer + `CLIPTextModelWithProjection`, used as Meissonic uses them.

Prompts are padded to 77 tokens (max length, truncated; fewer when the text encoder has fewer positions, as the demo's
32), no attention mask is passed (the reference lets the
transformer see pad states), the sequence is the penultimate hidden layer and the pooled vector is `text_embeds`.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77


def text_length(text_encoder: CLIPTextModelWithProjection) -> int:
    """How many tokens a prompt is padded or cut to: 77, or the encoder's position count when that is smaller."""
    return min(MAX_TOKENS, text_encoder.config.max_position_embeddings)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], length: int = MAX_TOKENS) -> torch.Tensor:
    """Prompts -> token ids (B, length)."""
    return tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (penultimate hidden states (B, 77, hidden), pooled projection (B, projection_dim))."""
    ids = tokenize(tokenizer, prompts, text_length(text_encoder)).to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out.text_embeds


def save_tokenizer(tokenizer: CLIPTokenizer, folder) -> None:
    """`save_pretrained`, plus the released `vocab.json` + `merges.txt` so older transformers can read the folder."""
    import json
    from pathlib import Path

    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
