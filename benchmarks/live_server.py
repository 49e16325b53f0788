"""What the live reliability benchmarks share: a server to run against (a given ``--url``
or one started here), its health and idle state, and writing the JSON report."""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

from benchmarks import report


def health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


async def wait_idle(url: str, timeout: float = 120) -> dict:
    """Wait until no request runs or waits and no KV block is held (or the timeout);
    returns what the server reports then."""
    from harness.server_process import kv_blocks_in_use, metrics

    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 and kv_blocks_in_use(m) == 0
        if idle or time.monotonic() > deadline:
            return {"kv_blocks_in_use": kv_blocks_in_use(m), "num_gpu_blocks": m.get("num_gpu_blocks"),
                    "requests_running": m["vllm:num_requests_running"], "requests_waiting": m["vllm:num_requests_waiting"]}
        await asyncio.sleep(0.5)


def parser(module: str, doc: str, *, quick: str | None = None) -> argparse.ArgumentParser:
    """``report.parser`` with ``--seed`` and the server to run against (``--url``)."""
    p = report.parser(module, doc, quick=quick, seed=0)
    p.add_argument("--url", help="run against this running server instead of starting one")
    return p


def run_report(name: str, args: Any, run: Callable[[Any, str, Any], Awaitable[dict]],
               extra_args: tuple[str, ...] = ()) -> dict:
    """``run(args, url, server)`` against ``args.url`` or a vllm-split server started here
    (stopped afterwards); writes the report (``run``'s entries after the arguments and the
    environment) to ``args.out`` and returns it."""
    server = None
    if args.url is None:
        from harness.model_prep import prepare
        from harness.server_process import VLLMServer

        log = Path(tempfile.mkdtemp(prefix=f"{name}-")) / "server.log"
        print(f"[{name}] starting a vllm-split server (log {log})", flush=True)
        server = VLLMServer(prepare(), split=True, log_path=log, extra_args=extra_args)
        server.wait_ready()
    try:
        measured = asyncio.run(run(args, args.url or server.url, server))
    finally:
        if server is not None:
            server.stop()
    data = {"arguments": report.arguments(args), "environment": report.environment(), **measured}
    report.write(args.out, data)
    return data
