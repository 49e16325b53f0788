"""Fuzz a live vllm-split server's WebSocket route with adversarial frames.

Several concurrent fuzzing clients drive sessions into each state (no Open yet; opened;
decoding, i.e. the server waits for an activation) and send frames the server must refuse
(``fuzz_frames.py``: garbage, truncated headers, huge declared lengths, wrong dtypes and
shapes, NaN/Inf, out-of-order positions, oversized frames, bad Opens, ...). Every frame
must be answered by an ``Error`` with a code and a message; a session whose frame was
refused without ``fatal`` must still work (it is advanced with valid activations now and
then). At the end: the engine is alive (``/health``, the server process), a real client
session before and after gives the same tokens, and no request or KV block is left.

    flock /tmp/vllm-engine.lock python -m benchmarks.fuzz_live --frames 10000   # results/fuzz_live.json
    python -m benchmarks.fuzz_live --url http://127.0.0.1:8000 --quick          # 300 frames, running server
"""
from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.live_server import health, parser, run_report, wait_idle

PROMPT = "What is the capital of France?"
RESPONSE_TIMEOUT_S = 60


class Tally:
    def __init__(self) -> None:
        self.frames = 0
        self.by_category: Counter = Counter()
        self.by_code: Counter = Counter()
        self.fatal = 0
        self.unanswered: list[str] = []  # categories whose frame got no Error
        self.no_message: list[str] = []
        self.internal: list[str] = []  # "internal" errors: a server bug, not a rejection
        self.advances = 0  # valid activations sent between adversarial frames
        self.extreme_sampling_sessions = 0  # valid Opens with extreme sampling values
        self.extreme_sampling_refused = 0  # ... that the server refused at Open (code "sampling")
        self.advance_failures: list[str] = []
        self.examples: dict[str, str] = {}


class Fuzzer:
    """One fuzzing client: owns a connection and the state of its session."""

    def __init__(self, url: str, fingerprint: str, rng: random.Random, tally: Tally) -> None:
        import aiohttp

        self.url, self.fingerprint, self.rng, self.tally = url, fingerprint, rng, tally
        self.http = aiohttp.ClientSession()
        self.ws = None
        self.state = None
        self.split_layer = rng.choice([0, 7, 15, 29])

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = self.state = None

    async def recv(self):
        import aiohttp

        from vllm_split.wire import protocol as wire

        msg = await self.ws.receive(timeout=RESPONSE_TIMEOUT_S)
        return wire.decode(msg.data) if msg.type == aiohttp.WSMsgType.BINARY else None

    async def enter(self, want: str) -> None:
        """Bring the connection to state ``want`` (a new connection when needed)."""
        from benchmarks.fuzz_frames import State, extreme_sampling, rows
        from vllm_split.wire.contract import SESSION_PATH
        from vllm_split.wire import protocol as wire

        if self.state is not None and self.state.name == want:
            return
        await self.close()
        self.ws = await self.http.ws_connect(self.url.replace("http://", "ws://") + SESSION_PATH, max_msg_size=0)
        self.state = State("fresh", self.fingerprint, self.split_layer)
        if want == "fresh":
            return
        extreme = self.rng.random() < 0.3
        sampling = extreme_sampling(self.rng) if extreme else wire.SamplingOptions(max_tokens=32, ignore_eos=True)
        self.tally.extreme_sampling_sessions += extreme
        await self.ws.send_bytes(wire.encode(wire.Open(model_fingerprint=self.fingerprint, split_layer=self.split_layer,
                                                       sampling=sampling)))
        opened = await self.recv()
        if extreme and isinstance(opened, wire.Error) and opened.code == "sampling" and opened.message:
            self.tally.extreme_sampling_refused += 1  # refused at Open, clearly: fine
            await self.close()
            return
        if not isinstance(opened, wire.Opened):
            raise RuntimeError(f"valid Open refused: {opened}")
        self.state.name, self.state.max_frame_bytes = "prompt", opened.max_frame_bytes
        if want == "prompt":
            return
        n = self.rng.randrange(1, 40)
        await self.ws.send_bytes(wire.encode(wire.Activation(start=0, dtype="float32", shape=(n, 576),
                                                             data=rows(n, self.rng), end_of_prompt=True)))
        await self.expect_token(n)

    async def expect_token(self, num_prompt: int) -> None:
        from vllm_split.wire import protocol as wire

        msg = await self.recv()
        if isinstance(msg, wire.Error) and msg.code in ("idle_timeout", "session_lifetime"):
            self.tally.by_code[msg.code] += 1  # a time limit ended the session: not a failure
            await self.close()
            return
        if not isinstance(msg, wire.Token):
            self.tally.advance_failures.append(repr(msg)[:200])
            await self.close()
            return
        if msg.finish_reason is not None:
            await self.close()  # generation over: next frame starts a new session
            return
        self.state.name, self.state.position = "decode", num_prompt + msg.index
        self.num_prompt = num_prompt

    async def advance(self) -> None:
        """Send the valid activation the server waits for: the session must go on."""
        from benchmarks.fuzz_frames import rows
        from vllm_split.wire import protocol as wire

        self.tally.advances += 1
        await self.ws.send_bytes(wire.encode(wire.Activation(start=self.state.position, dtype="float32", shape=(1, 576),
                                                             data=rows(1, self.rng))))
        await self.expect_token(self.num_prompt)

    async def one(self) -> None:
        from benchmarks.fuzz_frames import MAKERS, RARE
        from vllm_split.wire import protocol as wire

        want = self.rng.choices(["fresh", "prompt", "decode"], weights=[2, 3, 5])[0]
        await self.enter(want)
        if self.state is None:
            return
        if want == "decode" and self.rng.random() < 0.03:
            await self.advance()
            if self.state is None:
                return
            want = self.state.name
        makers = MAKERS[self.state.name]
        if self.rng.random() < 0.002:
            makers = RARE
        name = self.rng.choice(sorted(makers))
        data = makers[name](self.state, self.rng)
        self.tally.frames += 1
        self.tally.by_category[name] += 1
        await (self.ws.send_str(data) if isinstance(data, str) else self.ws.send_bytes(data))
        try:
            msg = await self.recv()
        except asyncio.TimeoutError:
            msg = None
        if not isinstance(msg, wire.Error):
            self.tally.unanswered.append(f"{name} in {self.state.name}: {msg!r}"[:300])
            await self.close()
            return
        self.tally.by_code[msg.code] += 1
        self.tally.examples.setdefault(f"{name}/{msg.code}", msg.message[:300])
        if not msg.message.strip():
            self.tally.no_message.append(name)
        if msg.code == "internal":
            self.tally.internal.append(f"{name}: {msg.message}"[:300])
        if msg.fatal:
            self.tally.fatal += 1
            await self.close()


async def fuzz(url: str, fingerprint: str, *, frames: int, workers: int, seed: int) -> Tally:
    tally = Tally()
    fuzzers = [Fuzzer(url, fingerprint, random.Random(seed * 1000 + i), tally) for i in range(workers)]

    async def loop(f: Fuzzer) -> None:
        try:
            while tally.frames < frames:
                await f.one()
        finally:
            await f.close()
            await f.http.close()

    await asyncio.gather(*(loop(f) for f in fuzzers))
    return tally


async def reference_tokens(url: str, model_dir: Path, prompt_ids: list[int]) -> list[int]:
    from client_lib import LocalLayers, SamplingOptions, SplitSession

    layers = LocalLayers(model_dir, split_layer=15)
    tokens = []
    async with await SplitSession.create(url, layers, sampling=SamplingOptions(max_tokens=16, ignore_eos=True)) as s:
        async for event in s.generate(prompt_ids):
            tokens.append(event.token_id)
    return tokens


async def run(args, url: str, server) -> dict:
    import torch
    from transformers import AutoTokenizer

    from vllm_split.wire.fingerprint import model_fingerprint
    from harness.model_prep import prepare

    torch.set_num_threads(1)
    model_dir = prepare()
    fingerprint = model_fingerprint(model_dir)
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    before = await reference_tokens(url, model_dir, prompt_ids)
    idle_before = await wait_idle(url)
    t0 = time.perf_counter()
    tally = await fuzz(url, fingerprint, frames=args.frames, workers=args.workers, seed=args.seed)
    seconds = time.perf_counter() - t0
    idle_after = await wait_idle(url)
    alive = health(url) and (server is None or server.proc.poll() is None)
    after = await reference_tokens(url, model_dir, prompt_ids) if alive else None
    leaked = idle_after["kv_blocks_in_use"] - idle_before["kv_blocks_in_use"]
    log = server.log_path.read_text(errors="replace") if server is not None else None
    return {
        "frames_tried": tally.frames,
        "seconds": round(seconds, 1),
        "engine_crashes": 0 if alive else 1,
        "engine_alive": alive,
        "leaked_kv_blocks": leaked,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "rejections_without_error_frame": len(tally.unanswered),
        "rejections_without_message": len(tally.no_message),
        "internal_errors": len(tally.internal),
        "server_log_tracebacks": log.count("Traceback") if log is not None else None,
        "fatal_rejections": tally.fatal,
        "valid_activations_between": tally.advances,
        "extreme_sampling_sessions": tally.extreme_sampling_sessions,
        "extreme_sampling_refused_at_open": tally.extreme_sampling_refused,
        "sessions_broken_by_rejections": len(tally.advance_failures),
        "reference_tokens_before": before,
        "reference_tokens_after": after,
        "reference_unchanged": before == after,
        "by_category": dict(sorted(tally.by_category.items())),
        "by_error_code": dict(sorted(tally.by_code.items())),
        "example_messages": dict(sorted(tally.examples.items())),
        "failures": {"unanswered": tally.unanswered[:20], "internal": tally.internal[:20],
                     "advance": tally.advance_failures[:20]},
    }


def ok(report: dict) -> bool:
    return (report["engine_alive"] and report["leaked_kv_blocks"] == 0 and report["reference_unchanged"]
            and report["rejections_without_error_frame"] == 0 and report["rejections_without_message"] == 0
            and report["internal_errors"] == 0 and report["sessions_broken_by_rejections"] == 0
            and not report["server_log_tracebacks"])


def main() -> None:
    p = parser("fuzz_live", __doc__, quick="CI smoke: --frames 300")
    p.add_argument("--frames", type=int, default=10000)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    if args.quick:
        args.frames = 300
    report = run_report("fuzz_live", args, run)
    print(f"[fuzz_live] {report['frames_tried']} frames in {report['seconds']} s: crashes {report['engine_crashes']}, "
          f"leaked KV blocks {report['leaked_kv_blocks']}, unanswered {report['rejections_without_error_frame']}, "
          f"internal errors {report['internal_errors']}, reference unchanged {report['reference_unchanged']}; wrote {args.out}")
    sys.exit(0 if ok(report) else 1)


if __name__ == "__main__":
    main()
