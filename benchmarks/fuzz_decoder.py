"""Coverage-guided fuzzing of the wire-format decoder (``vllm_split.wire.protocol.decode``).

Uses atheris (libFuzzer for Python, ``pip install atheris``): the decoder's bytecode is
instrumented and libFuzzer mutates a seed corpus of valid frames of every message kind
towards new branches. The property checked on every input: ``decode`` either raises
``ProtocolError`` with a non-empty message, or returns a message that re-encodes to a
frame decoding to the same message. Anything else (another exception, a mismatch) is a
crash: libFuzzer stops and saves the input.

    python -m benchmarks.fuzz_decoder --seconds 120        # writes results/fuzz_decoder.json
    python -m benchmarks.fuzz_decoder --quick              # CI smoke: 5 s

The parent process starts the fuzzing worker (libFuzzer exits the process when done) and
writes the JSON report from its final statistics.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks import report


def seed_frames() -> list[bytes]:
    import torch

    from vllm_split.wire import protocol as wire

    sampling = wire.SamplingOptions(max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop_token_ids=(2, 7))
    return [wire.encode(m) for m in (
        wire.Open(model_fingerprint="fp1-abc", split_layer=7, sampling=sampling),
        wire.Activation.from_tensor(torch.randn(2, 4), start=0, end_of_prompt=True),
        wire.Activation.from_tensor(torch.randn(1, 3, dtype=torch.float16), start=9),
        wire.Activation.from_tensor(torch.randn(1, 2, dtype=torch.bfloat16), start=1),
        wire.Close(),
        wire.Opened(session_id="s", split_layer=7, num_layers=30, hidden_size=576, dtype="float32", max_frame_bytes=99),
        wire.Token(index=3, token_id=42, finish_reason="length"),
        wire.Finished(finish_reason="stop", num_prompt_tokens=4, num_output_tokens=2),
        wire.Error(code="x", message="y", fatal=True),
    )]


def check_one(data: bytes) -> None:
    """The fuzzing property (see module docstring); raises on a violation."""
    from vllm_split.wire import protocol as wire

    try:
        msg = wire.decode(data, max_frame_bytes=1 << 20)
    except wire.ProtocolError as exc:
        if not str(exc):
            raise AssertionError("ProtocolError without a message") from exc
        return
    again = wire.decode(wire.encode(msg))
    if again != msg:
        raise AssertionError(f"re-encoding changed the message: {msg!r} -> {again!r}")


def worker(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["vllm_split.wire.protocol", "vllm_split.wire.tensors",
                                             "vllm_split.wire.errors", "vllm_split.wire.quant"]):
        from vllm_split.wire import protocol  # noqa: F401 (imported to be instrumented)
    atheris.instrument_func(check_one)
    atheris.Setup([sys.argv[0], *argv], check_one)
    atheris.Fuzz()


def run(seconds: int, workdir: Path) -> dict:
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(seed_frames()):
        (corpus / f"seed{i}").write_bytes(frame)
    artifacts = workdir / "crashes"
    artifacts.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.fuzz_decoder", "--worker", f"-max_total_time={seconds}",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/", "-max_len=4096", str(corpus)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=report.ROOT)
    wall = time.perf_counter() - t0
    log = proc.stderr.replace(str(workdir), "<workdir>")  # no path of this machine in the report
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    inited = re.findall(r"#\d+\s+INITED\s+cov: (\d+) ft: (\d+)", log)
    crashes = sorted(p.name for p in artifacts.iterdir())
    execs = int(re.findall(r"stat::number_of_executed_units: (\d+)", log)[-1]) if "number_of_executed_units" in log else None
    return {
        "fuzzer": f"atheris {version('atheris')} (libFuzzer), decoder bytecode instrumented",
        "target": "vllm_split.wire.protocol.decode + re-encode round trip",
        "executions": execs if execs is not None else (int(done[-1][0]) if done else None),
        "wall_seconds": round(wall, 1),
        "coverage_at_start": {"cov": int(inited[-1][0]), "ft": int(inited[-1][1])} if inited else None,
        "coverage_at_end": {"cov": int(done[-1][1]), "ft": int(done[-1][2]), "corpus": int(done[-1][3])} if done else None,
        "exit_code": proc.returncode,
        "crashes": len(crashes),
        "crash_files": crashes,
        "log_tail": log.splitlines()[-12:],
    }


def main() -> None:
    if "--worker" in sys.argv:
        worker([a for a in sys.argv[1:] if a != "--worker"])
        return
    p = report.parser("fuzz_decoder", __doc__, quick="CI smoke: --seconds 5")
    p.add_argument("--seconds", type=int, default=120)
    args = p.parse_args()
    if args.quick:
        args.seconds = 5
    with tempfile.TemporaryDirectory(prefix="fuzz-decoder-") as tmp:
        stats = run(args.seconds, Path(tmp))
    data = {"arguments": report.arguments(args), "environment": report.environment(), **stats}
    report.write(args.out, data)
    print(f"[fuzz_decoder] {data['executions']} executions, coverage {data['coverage_at_start']} -> "
          f"{data['coverage_at_end']}, crashes {data['crashes']}; wrote {args.out}")
    if data["crashes"] or data["exit_code"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
