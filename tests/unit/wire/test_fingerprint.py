"""The model fingerprint: equal for the same weights anywhere, different for any other model."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from vllm_split.wire import fingerprint as fp
from vllm_split.wire.fingerprint import FingerprintError, model_fingerprint

BIG_ELEMENTS = 100_000  # float32: 400,000 bytes, well over the 16 x 4 KiB that are hashed whole
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2,
          "_name_or_path": "/home/alice/models/tiny", "transformers_version": "4.51.0", "torch_dtype": "float32"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.weight": torch.randn(BIG_ELEMENTS, generator=g),
        "model.norm.weight": torch.ones(8),
    }


def _checkpoint(path, tensors=None, config=CONFIG, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors() if tensors is None else tensors
    names = sorted(tensors)
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def _window_offsets(num_bytes: int) -> list[int]:
    """Start of each sampled window, recomputed from the documented scheme."""
    step = (num_bytes - fp._WINDOW_BYTES) // (fp._WINDOWS - 1)
    return [i * step for i in range(fp._WINDOWS)]


def test_fingerprint_format_and_same_content_in_another_folder(tmp_path):
    a = model_fingerprint(_checkpoint(tmp_path / "a"))
    b = model_fingerprint(_checkpoint(tmp_path / "elsewhere" / "b"))
    assert a == b
    assert a.startswith(f"{fp.FINGERPRINT_VERSION}-") and len(a) == len("fp1-") + 64


def test_fingerprint_is_pinned(tmp_path):
    """Client and server may run different vllm-split versions: a change to the scheme must
    bump FINGERPRINT_VERSION (and then this value), or they would wrongly disagree/agree."""
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
         "b": (torch.arange(40_000) % 2048).to(torch.float16)}  # 80,000 bytes: windows sampled
    got = model_fingerprint(_checkpoint(tmp_path / "m", tensors=t, config={"num_hidden_layers": 1}))
    assert got == PINNED_FINGERPRINT, got


# computed independently (numpy + hashlib, from the module docstring's scheme)
PINNED_FINGERPRINT = "fp1-9405522f0075cc8f827f021ca9c82e2e6f7160bf7d4e543fafeabc6cd06cdf5e"


def test_changed_value_inside_a_sampled_window_changes_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    offsets = _window_offsets(BIG_ELEMENTS * 4)
    element = (offsets[7] + 100) // 4  # inside the 8th of 16 windows, far from both ends
    tensors = _tensors()
    tensors["model.layers.0.mlp.weight"][element] += 1e-3
    assert model_fingerprint(_checkpoint(tmp_path / "b", tensors=tensors)) != base


def test_only_the_sampled_windows_of_a_big_tensor_are_read(tmp_path):
    """The cost bound (<= 64 KiB read per tensor): bytes between windows are not hashed.
    Pins the sampling scheme the window test above relies on."""
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    offsets = _window_offsets(BIG_ELEMENTS * 4)
    gap = (offsets[0] + fp._WINDOW_BYTES + offsets[1]) // 2 // 4  # between window 0 and window 1
    tensors = _tensors()
    tensors["model.layers.0.mlp.weight"][gap] += 1.0
    assert model_fingerprint(_checkpoint(tmp_path / "b", tensors=tensors)) == base


def test_changed_value_in_a_small_tensor_changes_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    tensors = _tensors()
    tensors["model.norm.weight"][5] = 1.0001
    assert model_fingerprint(_checkpoint(tmp_path / "b", tensors=tensors)) != base


def test_renamed_tensor_changes_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    tensors = _tensors()
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    assert model_fingerprint(_checkpoint(tmp_path / "b", tensors=tensors)) != base


def test_dtype_or_shape_change_with_the_same_bytes_changes_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    reshaped = _tensors()
    reshaped["model.embed_tokens.weight"] = reshaped["model.embed_tokens.weight"].reshape(8, 16)
    assert model_fingerprint(_checkpoint(tmp_path / "b", tensors=reshaped)) != base
    retyped = _tensors()
    retyped["model.norm.weight"] = retyped["model.norm.weight"].view(torch.int32)
    assert model_fingerprint(_checkpoint(tmp_path / "c", tensors=retyped)) != base


def test_config_change_changes_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    assert model_fingerprint(_checkpoint(tmp_path / "b", config={**CONFIG, "num_hidden_layers": 1})) != base
    assert model_fingerprint(_checkpoint(tmp_path / "c", config={**CONFIG, "rope_theta": 10000.0})) != base
    assert model_fingerprint(_checkpoint(tmp_path / "d", config=None)) != base


def test_ignored_config_keys_do_not_change_it(tmp_path):
    base = model_fingerprint(_checkpoint(tmp_path / "a"))
    moved = {**CONFIG, "_name_or_path": "/srv/other/place", "transformers_version": "4.99.0", "use_cache": False}
    assert model_fingerprint(_checkpoint(tmp_path / "b", config=moved)) == base
    # key order and formatting of config.json do not matter either
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps(dict(reversed(list(CONFIG.items()))), indent=4))
    assert model_fingerprint(tmp_path / "c") == base


def test_no_safetensors_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    where = re.escape(str(tmp_path))
    with pytest.raises(FingerprintError, match=rf"no \*\.safetensors files in {where}: expected an HF checkpoint folder"):
        model_fingerprint(tmp_path)


def test_truncated_safetensors_file_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(FingerprintError, match=r"model\.safetensors: too short for a safetensors header"):
        model_fingerprint(tmp_path)


def test_sharded_checkpoint_equals_the_same_weights_in_one_file(tmp_path):
    one = model_fingerprint(_checkpoint(tmp_path / "one"))
    two_dir = _checkpoint(tmp_path / "two", shards=2)
    assert len(list(two_dir.glob("*.safetensors"))) == 2
    assert model_fingerprint(two_dir) == one
    tensors = _tensors()
    tensors["model.norm.weight"][0] = 2.0  # the tensor in the second shard
    assert model_fingerprint(_checkpoint(tmp_path / "three", tensors=tensors, shards=2)) != one
