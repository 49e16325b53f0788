"""This folder's server: a default vllm-split server, after a plain vLLM server for references."""
MAX_TOKENS = 64
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 1234}
