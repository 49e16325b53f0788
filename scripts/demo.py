"""The demo: a vllm-split server on the real model plus a client at a given split layer.

    scripts/demo.sh [--split-layer 7] [--prompt "..."] [--max-tokens 48]

Starts ``vllm-split serve`` on SmolLM2-135M-Instruct (CPU, float32), runs the client
library with layers [0, k) local, streams the answer and prints its timings, then asks the
same server for the same prompt the ordinary way (all layers on the server) and says
whether the two agree token for token. Stops the server at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import urllib.request
from pathlib import Path

from client_lib import cli
from harness.model_prep import prepare
from harness.server_process import VLLMServer


def plain_completion(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["token_ids"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-layer", type=int, default=7)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    import torch

    # Client and server share this machine's cores and the CPU server's worker pins one:
    # a one-thread client avoids OpenMP threads waiting behind it.
    torch.set_num_threads(1)
    model = prepare()
    log = Path(tempfile.mkdtemp(prefix="vllm-split-demo-")) / "server.log"
    print(f"[demo] starting `vllm-split serve` on {model.name} (log: {log}); about a minute on CPU...", flush=True)
    server = VLLMServer(model, split=True, log_path=log)
    try:
        server.wait_ready()
        print(f"[demo] server ready at {server.url}; the client runs layers [0, {args.split_layer}) "
              f"of 30 locally, the server the rest\n", flush=True)
        print(f"Q: {args.prompt}\nA: ", end="", flush=True)
        client_args = cli.parse_args(["--server", server.url, "--model", str(model), "--split-layer",
                                      str(args.split_layer), "--prompt", args.prompt, "--chat",
                                      "--max-tokens", str(args.max_tokens)])
        summary = asyncio.run(cli.run(client_args))
        print(f"\n[demo] {summary['prompt_tokens']} prompt tokens, {summary['output_tokens']} output tokens "
              f"({summary['finish_reason']})")
        print(f"[demo] time to first token: {summary['ttft_s'] * 1e3:.0f} ms")
        print(f"[demo] per token (median): client layers {summary['median_local_s_per_token'] * 1e3:.1f} ms, "
              f"server + network {summary['median_server_network_s_per_token'] * 1e3:.1f} ms")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        prompt_ids = cli._prompt_ids(tok, args.prompt, chat=True)
        plain = plain_completion(server.url, str(model), prompt_ids, args.max_tokens)
        same = plain == summary["token_ids"]
        print(f"[demo] unsplit generation on the same server: {'identical, token for token' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit(1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
