"""``vllm-split-client``: generate text through a vllm-split server, streaming to the terminal.

    vllm-split-client --server http://localhost:8000 --model DIR [--split-layer auto|K] \\
        [--max-layers M] [--ttft 2.0 --tpot 0.2] --prompt "What is the capital of France?" --max-tokens 64 \\
        [--privacy-floor F] [--wire-dtype auto|float16|int8_mixed|...] [--return-layer auto|M] \\
        [--draft ngram|none|DIR] [--num-drafts N] [--request-type TYPE] [--chat] [--timings]
    vllm-split-client serve --server http://localhost:8000 --model DIR [--port 8001]   # OpenAI gateway

``--return-layer M`` (or ``auto`` with ``--split-layer auto``) makes the session U-shaped
(``client_lib/ushape.py``): the client also runs layers ``[M, L)``, the LM head and sampling,
and no token id goes to the server. ``--draft ngram`` sends up to ``--num-drafts`` prompt-lookup
draft tokens with each activation, for the server to verify in one step (a server started with
``--split-drafts``; others grant none); ``--draft DIR`` drafts with the small model in that local
directory instead (``client_lib.drafts.make_drafter``); ``--request-type`` labels the kind of
request, for which the server measures how many drafts it accepts. ``serve`` runs the
OpenAI-compatible gateway (``client_lib/gateway``, docs/gateway.md). An ``https://`` server is
reached over ``wss://`` and its certificate verified against the system's CAs, or against
``--ca-file PATH`` (``--insecure``: no verification, testing only).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

from client_lib.gateway.generation import GATEWAY_DRAFTS, check_gateway_draft
from client_lib.local_layers import LocalLayers
from client_lib.session import PrivacyFloorError, ServerError, SplitSession, check_num_drafts
from client_lib.wire_policy import DEFAULT_MIN_AGREEMENT
from vllm_split.wire.contract import ErrorCode
from vllm_split.wire.drafts import check_request_type
from vllm_split.wire.protocol import WIRE_DTYPES
from vllm_split.wire.protocol import RequestSLA, SamplingOptions


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def _request_type(value: str) -> str:
    try:
        check_request_type(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _draft(value: str) -> str:
    """``--draft``: a drafter's name, or a draft model's local directory (kept as given)."""
    if value in GATEWAY_DRAFTS or os.path.isdir(value):
        return value
    raise argparse.ArgumentTypeError(f"expected 'ngram', 'none' or a draft model's local directory, got {value!r} "
                                     f"(no such directory)")


def _draft_name(value: str) -> str:
    """``--draft`` where no draft model is taken (the gateway): ``ngram`` or ``none``."""
    try:
        return check_gateway_draft(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _num_drafts(value: str) -> int:
    try:
        return check_num_drafts(int(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_tls_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--{prefix}ca-file PATH`` and ``--{prefix}insecure``: how an https:// split server's
    certificate is verified (read back with :func:`tls_option`)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(f"--{prefix}ca-file", type=_existing_file, default=None, metavar="PATH",
                       help="https:// server: trust this CA bundle or self-signed certificate (PEM) instead of "
                            "the system's CAs")
    group.add_argument(f"--{prefix}insecure", action="store_true",
                       help="https:// server: do not verify its certificate (for testing only)")


def add_draft_options(p: argparse.ArgumentParser, *, models: bool = True) -> None:
    """``--draft`` and ``--num-drafts``: ``SplitSession.create``'s ``draft`` and ``num_drafts``;
    ``models``: a draft model's directory is accepted too (else only ``ngram`` and ``none``)."""
    model_help = "; a directory: the small draft model there proposes them" if models else ""
    p.add_argument("--draft", default="none", type=_draft if models else _draft_name,
                   metavar="ngram|none|DIR" if models else "ngram|none",
                   help="draft tokens for the server to verify (speculative decoding, fewer round trips; a server "
                        f"started with --split-drafts): 'ngram' proposes them by prompt lookup over the prompt and "
                        f"the output so far{model_help}; default: none")
    p.add_argument("--num-drafts", type=_num_drafts, default=4, metavar="N",
                   help="--draft: most draft tokens per activation (1 to 16; the server may grant fewer); default 4")


def add_request_type_option(p: argparse.ArgumentParser, *, default: str | None = "",
                            default_help: str = "none") -> None:
    """``--request-type TYPE``: ``SplitSession.create``'s ``request_type`` (``default`` when not given)."""
    p.add_argument("--request-type", type=_request_type, default=default, metavar="TYPE",
                   help="the kind of request (e.g. code, chat; up to 32 characters): the server plans drafts with "
                        f"the tokens per round trip it measured for the type; default: {default_help}")


def add_privacy_floor_option(p: argparse.ArgumentParser) -> None:
    """``--privacy-floor F``: ``SplitSession.create``'s ``privacy_floor``."""
    p.add_argument("--privacy-floor", type=int, default=0, metavar="F",
                   help="send the server no activation shallower than layer F (the split layer is >= F, never "
                        "server decoding): shallow hidden states can be inverted back to the tokens; default 0")


def tls_option(ca_file: str | None, insecure: bool) -> str | bool | None:
    """``SplitSession.create``'s ``ssl`` from :func:`add_tls_options`' values."""
    return False if insecure else ca_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-split-client", description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://localhost:8000", help="vLLM server URL")
    p.add_argument("--model", required=True, help="local HF checkpoint folder (same weights as the server)")
    p.add_argument("--split-layer", default="auto",
                   help="run layers [0, k) locally; 'auto' (default): the server chooses k")
    p.add_argument("--max-layers", type=int, default=None,
                   help="most decoder layers this client holds in memory (auto loads only these; the server "
                        "chooses no k above it); default: no bound")
    add_privacy_floor_option(p)
    p.add_argument("--return-layer", default=None, metavar="auto|M",
                   help="U-shaped session: the server runs layers [split_layer, M) and returns the hidden state at "
                        "layer M; the client runs [M, L), the LM head and sampling (no token id leaves the device); "
                        "'auto' (with --split-layer auto): the server chooses both")
    p.add_argument("--wire-dtype", default=None, choices=["auto", *WIRE_DTYPES],
                   help="format of the activations on the wire; 'auto': the smallest whose measured agreement with "
                        "float32 on this model reaches --min-agreement (float32 for a model not measured); default: "
                        "the local layers' dtype (float32, exact)")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help="--wire-dtype auto: lowest greedy token match rate with float32 to accept (default "
                        f"{DEFAULT_MIN_AGREEMENT})")
    add_draft_options(p)
    add_request_type_option(p)
    p.add_argument("--ttft", type=float, default=None, help="SLA: time to first token (s)")
    p.add_argument("--tpot", type=float, default=None, help="SLA: time per output token (s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (use 1 when the server is a vLLM CPU server on the same machine)")
    p.add_argument("--api-key", default=None)
    add_tls_options(p)
    p.add_argument("--timings", action="store_true", help="print per-token timings")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    return p.parse_args(argv)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


async def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    split_layer = args.split_layer if args.split_layer == "auto" else int(args.split_layer)
    layers = LocalLayers(args.model, split_layer=split_layer, device=args.device, max_layers=args.max_layers)
    tail = None
    if args.return_layer is not None:
        from client_lib.tail_layers import TailLayers

        m = args.return_layer if args.return_layer == "auto" else int(args.return_layer)
        tail = TailLayers(args.model, return_layer=m, device=args.device)
    sla = RequestSLA(ttft_s=args.ttft, tpot_s=args.tpot) if (args.ttft or args.tpot) else None
    prompt_ids = _prompt_ids(tokenizer, args.prompt, args.chat)
    sampling = SamplingOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed)
    tokens: list[int] = []
    printed = ""
    async with await SplitSession.create(args.server, layers, sampling=sampling, api_key=args.api_key,
                                         sla=sla, expected_output_tokens=args.max_tokens,
                                         wire_dtype=args.wire_dtype, min_agreement=args.min_agreement,
                                         ssl=tls_option(args.ca_file, args.insecure),
                                         privacy_floor=args.privacy_floor, tail=tail, draft=args.draft,
                                         num_drafts=args.num_drafts, request_type=args.request_type) as session:
        async for event in session.generate(prompt_ids):
            tokens.append(event.token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
            if args.timings:
                sys.stderr.write(f"\n  [token {event.index}: local {event.local_seconds * 1e3:.1f} ms, "
                                 f"server+network {event.round_trip_seconds * 1e3:.1f} ms]\n")
        stats = session.stats
        opened = session.opened
    sys.stdout.write("\n")
    rtts = [e.round_trip_seconds for e in stats.events[1:]]
    locals_ = [e.local_seconds for e in stats.events[1:]]
    summary = {
        "split_layer": opened.split_layer, "return_layer": opened.return_layer, "placement": opened.placement, "num_layers": layers.num_layers,
        "wire_dtype": opened.wire_dtype,
        "predicted_ttft_s": opened.predicted_ttft_s, "predicted_tpot_s": opened.predicted_tpot_s,
        "tpot_s": stats.time_per_output_token,
        "prompt_tokens": stats.num_prompt_tokens, "output_tokens": stats.num_output_tokens,
        "finish_reason": stats.finish_reason, "text": printed, "token_ids": tokens,
        "ttft_s": stats.time_to_first_token,
        "median_local_s_per_token": statistics.median(locals_) if locals_ else None,
        "median_server_network_s_per_token": statistics.median(rtts) if rtts else None,
        "max_drafts": opened.max_drafts, "round_trips": stats.round_trips, "drafts_sent": stats.drafts_sent,
        "drafts_accepted": stats.drafts_accepted,
    }
    if opened.predicted_tpot_s is not None:
        sys.stderr.write(
            f"placement: split layer {opened.split_layer}/{layers.num_layers} ({opened.placement}); predicted "
            f"TTFT {opened.predicted_ttft_s * 1e3:.0f} ms, TPOT {opened.predicted_tpot_s * 1e3:.0f} ms; measured "
            f"TTFT {(stats.time_to_first_token or 0) * 1e3:.0f} ms, TPOT {(stats.time_per_output_token or 0) * 1e3:.0f} ms\n")
    if args.timings:
        sys.stderr.write(
            f"split_layer {opened.split_layer}/{layers.num_layers}: {stats.num_prompt_tokens} prompt + "
            f"{stats.num_output_tokens} output tokens ({stats.finish_reason}); TTFT "
            f"{(stats.time_to_first_token or 0) * 1e3:.0f} ms; per token: local "
            f"{(summary['median_local_s_per_token'] or 0) * 1e3:.1f} ms, server+network "
            f"{(summary['median_server_network_s_per_token'] or 0) * 1e3:.1f} ms (medians)\n")
    if args.timings and stats.drafts_sent:
        sys.stderr.write(f"drafts: {stats.drafts_accepted}/{stats.drafts_sent} accepted; "
                         f"{stats.tokens_per_round_trip:.2f} tokens per round trip\n")
    if args.json:
        print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from client_lib.gateway.serve import main as serve

        serve(argv[1:])
        return
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except ServerError as exc:
        sys.exit(f"{'connection' if exc.code == ErrorCode.TLS else 'server'} error: {exc}")
    except PrivacyFloorError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
