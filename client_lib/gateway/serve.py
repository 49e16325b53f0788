"""``vllm-split-client serve``: run the OpenAI-compatible gateway on this device.

    vllm-split-client serve --server http://SERVER:8000 --model DIR [--host 127.0.0.1 --port 8001] \\
        [--split-layer auto|K] [--max-layers M] [--ttft S --tpot S] [--api-key KEY] [--threads N] \\
        [--privacy-floor F] [--server-ca-file PATH | --server-insecure]   # https:// server: its certificate's CA
        [--draft ngram|none] [--num-drafts N] [--request-type TYPE]     # drafts: a --split-drafts server

Loads the model's first layers once (``LocalLayers``, shared by every request through
``SharedLayers``), measures this device's speed once when the server chooses the split layer
(cached per device and model), and serves ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``; each request is one split session with the server. With ``--draft
ngram`` every session drafts by prompt lookup (docs/drafts.md) and is labelled with its endpoint's
kind (``chat``, ``completion``) unless ``--request-type`` gives one label for all.
"""
from __future__ import annotations

import argparse
import logging
import os

from client_lib.cli import (add_draft_options, add_privacy_floor_option, add_request_type_option, add_tls_options,
                            tls_option)
from client_lib.gateway.app import Gateway, GatewayConfig, create_app
from client_lib.gateway.generation import Upstream
from client_lib.gateway.openai_requests import SamplingDefaults
from vllm_split.wire import protocol as wire

DEFAULT_MAX_TOKENS = 4096  # the server's default max_tokens_per_session
API_KEY_ENV = "VLLM_SPLIT_GATEWAY_API_KEY"

logger = logging.getLogger("client_lib.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-split-client serve", description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://localhost:8000", help="the vllm-split server URL")
    p.add_argument("--server-api-key", default=None, help="the split server's --api-key, if it has one")
    add_tls_options(p, prefix="server-")
    p.add_argument("--model", required=True, help="local HF checkpoint folder (same weights as the server)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) requests may give (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; none)")
    p.add_argument("--split-layer", default="auto",
                   help="run layers [0, k) on this device; 'auto' (default): the server chooses k per request")
    p.add_argument("--max-layers", type=int, default=None,
                   help="most decoder layers held in memory (auto loads only these); default: no bound")
    add_privacy_floor_option(p)
    add_draft_options(p, models=False)
    add_request_type_option(p, default=None, default_help="the endpoint's kind (chat, completion) when drafting, "
                                                          "else none; '' : none")
    p.add_argument("--ttft", type=float, default=None, help="SLA sent with every session: time to first token (s)")
    p.add_argument("--tpot", type=float, default=None, help="SLA sent with every session: time per output token (s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens of a request that gives none (keep <= the server's max_tokens_per_session)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (use 1 when the server is a vLLM CPU server on the same machine)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def build_app(args: argparse.Namespace):
    """Load the layers and tokenizer, measure the device once if needed, and make the app."""
    from transformers import AutoConfig, AutoTokenizer

    from client_lib.client_profile import client_profile
    from client_lib.local_layers import LocalLayers
    from client_lib.session import check_privacy_floor
    from client_lib.shared_layers import SharedLayers

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    split_layer = args.split_layer if args.split_layer == "auto" else int(args.split_layer)
    layers = LocalLayers(args.model, split_layer=split_layer, device=args.device, max_layers=args.max_layers)
    check_privacy_floor(layers, args.privacy_floor)  # at start-up, not on every request
    profile = None
    if layers.auto:
        logger.info("measuring this device's layer speed (once per device and model, then cached)")
        profile = client_profile(layers)
    sla = wire.RequestSLA(ttft_s=args.ttft, tpot_s=args.tpot) if (args.ttft or args.tpot) else None
    max_model_len = args.max_model_len or AutoConfig.from_pretrained(args.model).max_position_embeddings
    config = GatewayConfig(model_names=tuple(args.served_model_name or [args.model]), model_root=str(args.model),
                           max_model_len=max_model_len, default_max_tokens=args.default_max_tokens,
                           api_key=args.api_key, sampling_defaults=SamplingDefaults.from_model_dir(args.model))
    upstream = Upstream(url=args.server, layers=SharedLayers(layers), profile=profile, sla=sla,
                        api_key=args.server_api_key, ssl=tls_option(args.server_ca_file, args.server_insecure),
                        privacy_floor=args.privacy_floor, draft=args.draft, num_drafts=args.num_drafts,
                        request_type=args.request_type)
    gateway = Gateway(config, upstream, AutoTokenizer.from_pretrained(args.model))
    where = "chosen by the server per request" if layers.auto else str(layers.split_layer)
    logger.info("gateway for %s at http://%s:%d/v1 -> split server %s; split layer %s of %d",
                config.model_names[0], args.host, args.port, args.server, where, layers.num_layers)
    return create_app(gateway)


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(build_app(args), host=args.host, port=args.port, print=None)
