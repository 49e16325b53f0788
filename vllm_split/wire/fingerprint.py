"""A fingerprint of a model's weights, the same on client and server.

Client and server must hold the same weights, or the server resumes from activations of
another model and answers nonsense. Hashing every byte of an 8B checkpoint takes a minute,
so the fingerprint hashes what identifies a checkpoint cheaply and reliably:

* ``config.json`` (canonical JSON, minus keys that do not change the math),
* every tensor's name, dtype and shape from the safetensors headers,
* a sample of every tensor's bytes: 16 evenly spaced 4 KiB windows (all bytes if smaller).

Any fine-tune or re-quantization changes sampled bytes of every tensor, so a mismatch is
caught; reading costs at most 64 KiB per tensor. Standard library only (no torch, no vLLM).
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

FINGERPRINT_VERSION = "fp1"
_WINDOWS = 16
_WINDOW_BYTES = 4096
# config keys that do not change what the weights compute
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


class FingerprintError(ValueError):
    """The folder is not a safetensors checkpoint we can fingerprint."""


def model_fingerprint(model_dir: str | Path) -> str:
    """``fp1-<sha256 hex>`` of the checkpoint in ``model_dir`` (see module docstring)."""
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FingerprintError(f"no *.safetensors files in {root}: expected an HF checkpoint folder")
    digest = hashlib.sha256()
    config_path = root / "config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise FingerprintError(f"{config_path}: not valid JSON: {exc}") from exc
        config = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True).encode())
    tensors = []
    for path in files:
        tensors.extend(_tensor_entries(path))
    for name, path, info, data_start in sorted(tensors, key=lambda t: t[0]):
        digest.update(f"{name}|{info['dtype']}|{info['shape']}".encode())
        begin, end = info["data_offsets"]
        digest.update(_sample(path, data_start + begin, end - begin))
    return f"{FINGERPRINT_VERSION}-{digest.hexdigest()}"


def _tensor_entries(path: Path):
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise FingerprintError(f"{path}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > 100 * 1024 * 1024:
            raise FingerprintError(f"{path}: header length {header_len} is implausible")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise FingerprintError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    data_start = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise FingerprintError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets in the header")
        yield name, path, info, data_start


def _sample(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        if size <= _WINDOWS * _WINDOW_BYTES:
            fh.seek(offset)
            return fh.read(size)
        step = (size - _WINDOW_BYTES) // (_WINDOWS - 1)
        chunks = []
        for i in range(_WINDOWS):
            fh.seek(offset + i * step)
            chunks.append(fh.read(_WINDOW_BYTES))
        return b"".join(chunks)
