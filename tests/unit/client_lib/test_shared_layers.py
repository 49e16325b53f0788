"""Concurrent sessions over one set of loaded layers: each view keeps its own KV cache, so
interleaved sessions compute exactly the rows that separate ``LocalLayers`` compute."""
from __future__ import annotations

import asyncio

import pytest
import torch

from client_lib import LocalLayers, LocalLayersError
from client_lib.shared_layers import SharedLayers
from tests.unit.client_lib.conftest import NUM_LAYERS


def _rows_alone(model_dir, k: int, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    layers = LocalLayers(model_dir, split_layer=k)
    return torch.cat([layers.forward(prompt)] + [layers.forward([t]) for t in tokens])


async def _rows_shared(view, k: int | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    if k is not None:
        view.use_split_layer(k)
    rows = [await view.aforward(prompt)]
    for t in tokens:
        await asyncio.sleep(0)  # let the other sessions step in between
        rows.append(await view.aforward([t]))
    return torch.cat(rows)


async def test_interleaved_views_at_different_split_layers_equal_separate_layers(tiny_chat_model):
    shared = SharedLayers(LocalLayers(tiny_chat_model))  # auto: every layer loaded once
    jobs = [(1, [5, 6, 7], [8, 9, 10]), (3, [11, 12], [13, 14, 15, 16]), (NUM_LAYERS, [5, 6, 7], [20, 21]),
            (3, [30, 31, 32, 33], [34]), (0, [40], [41, 42])]
    try:
        views = [shared.view() for _ in jobs]
        assert all(v.auto and v.split_layer == NUM_LAYERS for v in views)
        got = await asyncio.gather(*[_rows_shared(v, k, p, t) for v, (k, p, t) in zip(views, jobs)])
    finally:
        shared.close()
    for (k, prompt, tokens), rows in zip(jobs, got):
        assert torch.equal(rows, _rows_alone(tiny_chat_model, k, prompt, tokens)), f"the view at k={k} diverged"
    assert len(shared.layers.model.layers) == NUM_LAYERS  # the shared model is left whole


async def test_a_fixed_split_layer_is_every_views_and_reset_starts_over(tiny_chat_model):
    shared = SharedLayers(LocalLayers(tiny_chat_model, split_layer=2))
    try:
        a, b = shared.view(), shared.view()
        assert not a.auto and a.split_layer == 2 and a.fingerprint == shared.layers.fingerprint
        first = await a.aforward([5, 6])
        await b.aforward([7, 8, 9])
        a.reset()
        assert torch.equal(await a.aforward([5, 6]), first) and a.num_positions == 2 and b.num_positions == 3
        assert torch.equal(a.forward([7]), _rows_alone(tiny_chat_model, 2, [5, 6], [7])[-1:])
    finally:
        shared.close()


def test_a_split_layer_above_the_loaded_layers_is_refused(tiny_chat_model):
    shared = SharedLayers(LocalLayers(tiny_chat_model, max_layers=2))
    try:
        view = shared.view()
        with pytest.raises(LocalLayersError, match=r"split layer 3 needs layers this client did not load "
                                                   r"\(it has 2, max_layers 2\)"):
            view.use_split_layer(3)
    finally:
        shared.close()
