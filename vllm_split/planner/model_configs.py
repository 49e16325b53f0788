"""Model shapes for the analytic cost model, read from HF-style ``config.json`` dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .problem import PlannerInputError

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The numbers of a Llama-style decoder the cost model needs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int = 2  # bytes per weight / activation / KV element

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size", "dtype_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlannerInputError(f"ModelConfig({self.name!r}).{name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise PlannerInputError(
                f"ModelConfig({self.name!r}): hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PlannerInputError(
                f"ModelConfig({self.name!r}): num_attention_heads {self.num_attention_heads} is not "
                f"divisible by num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping, *, name: str | None = None) -> ModelConfig:
        """Build from a HF ``config.json`` dict (``torch_dtype`` or ``dtype_bytes`` for the dtype)."""
        required = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")
        missing = [key for key in required if key not in config]
        if missing:
            raise PlannerInputError(f"HF config lacks {missing}; it needs all of {list(required)}")
        if "dtype_bytes" in config:
            dtype_bytes = config["dtype_bytes"]
        else:
            dtype = str(config.get("torch_dtype", "bfloat16")).removeprefix("torch.")
            if dtype not in _DTYPE_BYTES:
                raise PlannerInputError(f"unknown torch_dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
            dtype_bytes = _DTYPE_BYTES[dtype]
        return cls(
            name=name or str(config.get("_name_or_path", config.get("model_type", "model"))),
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )


# Source: HuggingFaceTB/SmolLM2-135M-Instruct config.json on the Hugging Face Hub (the
# project's model: Llama architecture, 30 layers, tied embeddings).
SMOLLM2_135M_CONFIG = {
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
# Source: meta-llama/Meta-Llama-3-8B config.json on the Hugging Face Hub.
LLAMA3_8B_CONFIG = {
    "_name_or_path": "meta-llama/Meta-Llama-3-8B",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# Source: meta-llama/Meta-Llama-3-70B config.json on the Hugging Face Hub.
LLAMA3_70B_CONFIG = {
    "_name_or_path": "meta-llama/Meta-Llama-3-70B",
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

SMOLLM2_135M = ModelConfig.from_hf_config(SMOLLM2_135M_CONFIG, name="SmolLM2-135M-Instruct")
LLAMA3_8B = ModelConfig.from_hf_config(LLAMA3_8B_CONFIG, name="Llama-3-8B")
LLAMA3_70B = ModelConfig.from_hf_config(LLAMA3_70B_CONFIG, name="Llama-3-70B")
KNOWN_MODELS = {m.name: m for m in (SMOLLM2_135M, LLAMA3_8B, LLAMA3_70B)}
