"""Pipeline parallelism in vLLM's default compiled mode, with ``--split-min-layer``.

One server, ``--pipeline-parallel-size 2 --split-min-layer 4`` without ``--enforce-eager``:
stage 0 holds layers [4, 15) (no weights, no KV cache below the lowest split layer served),
stage 1 [15, 30). Each stage compiles the split layer bodies of its own layers at start-up
(``compiled_layers.CompiledLayers``: no model run, so it neither needs nor allocates stage 1's
receive buffer, which ``patches/pp_intermediate_tensors.py`` allocates after ``load_model``
and vLLM's own compile warm-up then reuses) and split steps take the compact forward on both. Split
sessions at the lowest layer (4), on each stage (7, 22), at the boundary (15) and at
``k = L`` must equal transformers' greedy decoding token for token. A ``min_layer`` that
leaves a stage no layer at or above it is a start-up error that names the stage.
"""
from __future__ import annotations

import asyncio

import pytest

from harness.server_process import VLLMServer
from tests.engine_parallel.conftest import NUM_TOKENS
from tests.engine_parallel.test_pipeline_parallel import PP_ARGS, PP_ENV, pytestmark  # noqa: F401
from tests.support.sessions import local_layers, split_generate

MIN_LAYER = 4


@pytest.fixture(scope="module")
def compiled_pp(model_dir, reference, tmp_path_factory):
    log = tmp_path_factory.mktemp("split-pp2-compiled") / "server.log"
    with VLLMServer(model_dir, split=True, log_path=log, env=PP_ENV, eager=False,
                    extra_args=(*PP_ARGS, "--split-min-layer", str(MIN_LAYER))) as server:
        yield server


def test_each_stage_compiles_its_split_layer_bodies_and_takes_the_compact_forward(compiled_pp):
    log = compiled_pp.log_path.read_text(errors="replace")
    assert "this server holds layers [4, 15)" in log and "this server holds layers [15, 30)" in log
    assert "split steps take the COMPACT forward on this stage's layers [4, 15) (pipeline stage 0 of 2)" in log
    assert "split steps take the COMPACT forward on this stage's layers [15, 30) (pipeline stage 1 of 2)" in log
    assert "split steps run EAGER decoder layers" not in log
    assert log.count("vllm-split: compiled the split layer bodies") == 2, "expected one line per stage"


async def test_concurrent_sessions_equal_reference(compiled_pp, model_dir, prompt_ids, reference):
    ks = [MIN_LAYER, 7, 15, 22, 30]
    sessions = [split_generate(compiled_pp.url, local_layers(model_dir, k), prompt_ids[i % 3],
                               max_tokens=NUM_TOKENS, ignore_eos=True) for i, k in enumerate(ks)]
    for i, (k, (tokens, _)) in enumerate(zip(ks, await asyncio.gather(*sessions))):
        assert tokens == reference[i % 3], f"split session at k={k} diverged"


def test_a_stage_without_a_layer_at_or_above_min_layer_is_a_startup_error(model_dir, compiled_pp, tmp_path):
    compiled_pp.stop()  # one engine at a time
    server = VLLMServer(model_dir, split=True, log_path=tmp_path / "server.log", env=PP_ENV, eager=True,
                        extra_args=(*PP_ARGS, "--split-min-layer", "20"))
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()
    assert ("min_layer 20 with pipeline parallel size 2: stage 0 holds layers [0, 15), none at or above 20"
            in (tmp_path / "server.log").read_text(errors="replace"))
