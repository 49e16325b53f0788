"""This folder's server: one default vllm-split server (gathered composition, compiled layer
bodies). Its own ordinary requests are the unsplit references (the plugin leaves them
unchanged: tests/engine/test_split_generation.py), so the folder starts one engine."""
from __future__ import annotations

MAX_TOKENS = 24
NUM_PROMPTS = 3
# (k, m): the client runs [0, k) and [m, 30); k = 0 and m = L = 30 included
PAIRS = [(0, 30), (0, 12), (7, 22), (15, 30), (29, 30)]
