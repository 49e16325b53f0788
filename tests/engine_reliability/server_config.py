"""This folder's server: small limits and a tiny KV cache (so that the engine preempts)."""
MAX_TOKENS = 24
PROMPT_REPEAT = 8  # prompts of ~60-100 tokens: ten sessions overflow the KV cache below
NUM_KV_BLOCKS = 24  # x 32 tokens: 768 tokens of KV cache for the whole server
LIMITS = {"max-frame-bytes": 1024 * 1024, "max-sessions": 12, "max-prompt-tokens": 400, "max-tokens-per-session": 48,
          "idle-timeout-s": 3, "session-lifetime-s": 12}
SERVER_ARGS = ("--num-gpu-blocks-override", str(NUM_KV_BLOCKS), "--block-size", "32", "--max-model-len", "512",
               "--max-num-batched-tokens", "128", *(a for k, v in LIMITS.items() for a in (f"--split-{k}", str(v))))
