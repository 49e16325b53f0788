"""Tiny random-weight models for the engine tests: no download, a transformers config saved
with random weights and the real SmolLM2 tokenizer files copied beside it."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_model(out: Path, model_dir: Path, config) -> Path:
    """Save a float32 model of ``config`` with seeded random weights in ``out``, with
    ``model_dir``'s tokenizer files."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights: sharper, less tie-prone logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out
