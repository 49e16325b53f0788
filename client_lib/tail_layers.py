"""The client's tail of a U-shaped session: decoder layers ``[return_layer, L)``, the final
norm and the LM head, with their own KV cache.

Runs in the client's process (no vLLM). Loads only those tensors from the checkpoint's
safetensors files (the LM head from ``lm_head.weight``, or the embedding matrix when the
checkpoint ties them), runs them with transformers on CPU or CUDA and keeps a KV cache for
its layers: the server sends the hidden state at layer ``m`` of every prompt position, then
one row per decoded position (:mod:`vllm_split.wire.ushape`), and :meth:`forward` turns the
rows into the logits of the last one. ``return_layer="auto"`` loads every layer, for a
session whose ``m`` the server chooses (:meth:`use_return_layer`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from client_lib.local_layers import LocalLayersError, checkpoint_files


class TailLayers:
    """Decoder layers ``[return_layer, L)`` + final norm + LM head of an HF decoder-only checkpoint."""

    def __init__(self, model_dir: str | Path, *, return_layer: int | str = "auto", device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoConfig, AutoModel

        self.model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        num_layers = config.num_hidden_layers
        self.auto = return_layer == "auto"
        first = 0 if self.auto else return_layer
        if not self.auto and (isinstance(first, bool) or not isinstance(first, int) or not 0 < first <= num_layers):
            raise LocalLayersError(f"return_layer {return_layer!r} out of range: expected 'auto' or "
                                   f"1 <= return_layer <= {num_layers}")
        self.num_layers = num_layers
        self.return_layer = num_layers if self.auto else first
        self.hidden_size = config.hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.eos_token_ids = _eos_ids(self.model_dir, config)
        self._first_loaded = first
        held = num_layers - first
        config.num_hidden_layers = max(held, 1)  # transformers wants >= 1 layer
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[first:] or config.layer_types[:1]
        model = AutoModel.from_config(config, dtype=dtype)
        if held == 0:
            model.layers = torch.nn.ModuleList()
        model.embed_tokens = None  # rows come in at layer m
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self._load_weights(model, first)
        self.model = model.to(self.device).eval()
        self.lm_head = self.lm_head.to(self.device).eval()
        self._all_layers = self.model.layers
        self.use_return_layer(self.return_layer)

    def _load_weights(self, model: torch.nn.Module, first: int) -> None:
        wanted = set(model.state_dict())
        rename = {f"layers.{first + i}.": f"layers.{i}." for i in range(self.num_layers - first)}
        state: dict[str, torch.Tensor] = {}
        head = embed = None
        for path in checkpoint_files(self.model_dir):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    if key == "lm_head.weight":
                        head = fh.get_tensor(key).to(self.dtype)
                        continue
                    name = key.removeprefix("model.")
                    if name == "embed_tokens.weight":
                        embed = fh.get_tensor(key).to(self.dtype)
                        continue
                    prefix = next((p for p in rename if name.startswith(p)), None)
                    if prefix is not None:
                        name = rename[prefix] + name[len(prefix):]
                    elif name.startswith("layers."):
                        continue
                    if name in wanted:
                        state[name] = fh.get_tensor(key).to(self.dtype)
        missing = sorted(wanted - set(state))
        if missing or (head is None and embed is None):
            raise LocalLayersError(f"{self.model_dir}: checkpoint lacks {len(missing)} tensor(s) the client's tail "
                                   f"needs, e.g. {missing[:3] or ['lm_head.weight']}")
        model.load_state_dict(state, strict=True)
        self.lm_head.weight.data.copy_(head if head is not None else embed)

    def use_return_layer(self, return_layer: int) -> None:
        """Run layers ``[return_layer, L)`` from now on (an ``auto`` session's placement)."""
        if isinstance(return_layer, bool) or not isinstance(return_layer, int) or not (
                self._first_loaded <= return_layer <= self.num_layers and return_layer >= 1):
            raise LocalLayersError(f"return layer {return_layer} needs layers this client did not load (it holds "
                                   f"[{self._first_loaded}, {self.num_layers}))")
        skip = return_layer - self._first_loaded
        self.model.layers = self._all_layers[skip:]
        for i, layer in enumerate(self.model.layers):  # the KV cache is indexed by position in the list
            layer.self_attn.layer_idx = i
        self.model.config.num_hidden_layers = max(len(self.model.layers), 1)
        self.return_layer = return_layer
        self.reset()

    def reset(self) -> None:
        """Forget the KV cache (start a new sequence)."""
        self.cache = None
        self.num_positions = 0

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[vocab]`` (float32) of the last of ``hidden``'s rows (the hidden states at
        layer ``return_layer`` of the next positions, ``[rows, hidden_size]``)."""
        h = hidden.to(self.device, self.dtype)[None]
        if len(self.model.layers):
            from transformers import DynamicCache

            if self.cache is None:
                self.cache = DynamicCache()
            positions = torch.arange(self.num_positions, self.num_positions + h.shape[1], device=self.device)[None]
            out = self.model(inputs_embeds=h, past_key_values=self.cache, use_cache=True, position_ids=positions)
            normed = out.last_hidden_state
        else:
            normed = self.model.norm(h)
        self.num_positions += h.shape[1]
        return self.lm_head(normed[0, -1]).float().cpu()


def _eos_ids(model_dir: Path, config) -> tuple[int, ...]:
    """The model's end-of-sequence ids: ``generation_config.json``'s, else the config's."""
    path = model_dir / "generation_config.json"
    value = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    if value is None:
        value = getattr(config, "eos_token_id", None)
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
