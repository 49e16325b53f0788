"""The client's share of the model: embeddings and decoder layers ``[0, split_layer)``.

Loads only those tensors from the checkpoint's safetensors files (never the whole
model), runs them with transformers on CPU or CUDA, and keeps its own KV cache for the
local layers. The output is the hidden state entering layer ``split_layer`` (the residual
stream, before any norm), which is what the server resumes from.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_split.wire.fingerprint import model_fingerprint


class LocalLayersError(ValueError):
    """The checkpoint or the split layer cannot be used (message says why)."""


@dataclass(frozen=True, slots=True)
class StepTiming:
    rows: int
    seconds: float


class LocalLayers:
    """Embeddings + layers ``[0, split_layer)`` of an HF decoder-only checkpoint.

    ``split_layer="auto"`` loads every layer and lets the server choose: the session calls
    :meth:`use_split_layer` with the server's answer. ``max_layers`` bounds the decoder
    layers this client holds in memory: ``auto`` then loads ``min(num_layers, max_layers)``
    of them, the session sends the bound in its profile (``ClientProfile.max_layers``) and
    the server chooses no split layer above it. None: no bound.
    """

    def __init__(self, model_dir: str | Path, *, split_layer: int | str = "auto", device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_layers: int | None = None) -> None:
        from transformers import AutoConfig, AutoModel, DynamicCache

        self.model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        num_layers = config.num_hidden_layers
        bad_bound = isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 0
        if max_layers is not None and bad_bound:
            raise LocalLayersError(f"max_layers {max_layers!r}: expected None (no bound) or an int >= 0")
        self.max_layers = None if max_layers is None else min(max_layers, num_layers)
        limit = num_layers if self.max_layers is None else self.max_layers
        self.auto = split_layer == "auto"
        if self.auto:
            split_layer = limit
        if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= limit:
            bound = f" (max_layers {max_layers})" if limit < num_layers else ""
            raise LocalLayersError(f"split_layer {split_layer!r} out of range: expected 'auto' or "
                                   f"0 <= split_layer <= {limit}{bound}")
        self.split_layer = split_layer
        self.num_layers = num_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size  # token ids a drafter may propose (client_lib/drafts.py)
        self.device = torch.device(device)
        self.dtype = dtype
        self.fingerprint = model_fingerprint(self.model_dir)
        self._cache_cls = DynamicCache
        config.num_hidden_layers = max(split_layer, 1)  # transformers wants >= 1 layer
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        config.tie_word_embeddings = False
        model = AutoModel.from_config(config, dtype=dtype)
        if split_layer == 0:
            model.layers = torch.nn.ModuleList()
        model.norm = torch.nn.Identity()  # the server applies the final norm
        self._load_weights(model)
        self.model = model.to(self.device).eval()
        self.cache = None
        self.num_positions = 0
        self.timings: list[StepTiming] = []

    def _load_weights(self, model: torch.nn.Module) -> None:
        wanted = {name for name in model.state_dict()}
        state: dict[str, torch.Tensor] = {}
        for path in checkpoint_files(self.model_dir):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    name = key.removeprefix("model.")
                    if name in wanted:
                        state[name] = fh.get_tensor(key).to(self.dtype)
        missing = sorted(wanted - set(state))
        if missing:
            raise LocalLayersError(f"{self.model_dir}: checkpoint lacks {len(missing)} tensor(s) the client needs, e.g. {missing[:3]}")
        model.load_state_dict(state, strict=True)

    def use_split_layer(self, split_layer: int) -> None:
        """Run only layers ``[0, split_layer)`` from now on (an ``auto`` session's placement)."""
        loaded = len(self.model.layers) if self.split_layer else 0
        if not 0 <= split_layer <= loaded:
            bound = f", max_layers {self.max_layers}" if self.max_layers is not None else ""
            raise LocalLayersError(f"split layer {split_layer} needs layers this client did not load (it has "
                                   f"{loaded}{bound})")
        self.model.layers = self.model.layers[:split_layer]
        self.model.config.num_hidden_layers = max(split_layer, 1)
        self.split_layer = split_layer
        self.reset()

    def reset(self) -> None:
        """Forget the KV cache (start a new sequence)."""
        self.cache = None
        self.num_positions = 0

    def truncate(self, num_positions: int) -> None:
        """Keep the first ``num_positions`` positions of the KV cache and forget the rest (the
        rows of drafts the server rejected): the next :meth:`forward` continues from there."""
        self.num_positions = truncate_cache(self.cache, self.num_positions, num_positions)

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Hidden states at ``split_layer`` for the next tokens: ``[len(token_ids), hidden]``."""
        t0 = time.perf_counter()
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        if self.split_layer == 0:
            hidden = self.model.embed_tokens(ids)
        else:
            if self.cache is None:
                self.cache = self._cache_cls()
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
            hidden = out.last_hidden_state
        self.num_positions += len(token_ids)
        self.timings.append(StepTiming(rows=len(token_ids), seconds=time.perf_counter() - t0))
        return hidden[0].to("cpu")


def truncate_cache(cache, num_positions: int, keep: int) -> int:
    """Drop the positions from ``keep`` on of a transformers ``DynamicCache`` holding
    ``num_positions`` (None: no cache, split layer 0); the new position count."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= num_positions:
        raise ValueError(f"truncate: expected 0 <= num_positions <= {num_positions} (the positions held), got {keep!r}")
    if cache is not None and keep < num_positions:
        cache.crop(keep - num_positions)  # negative: remove that many from the end (transformers 4.x and 5.x)
    return keep


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (those its index names, else every one in the folder)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))
