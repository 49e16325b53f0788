"""Client drafts (issue 14): TPOT and tokens per round trip with and without n-gram drafts,
per request type and emulated link, and the server's layer-rows per output token.

    python -m benchmarks.bench_drafts [--quick] [--prompts 5] [--max-tokens 64] [--split-layer 15]
        [--num-drafts 4] [--out results/bench_drafts.json]

One split server (``vllm-split serve --split-drafts γ``, vLLM's default compiled mode,
prefix caching off, ``VLLM_SPLIT_STEP_LOG`` on) and one real client (``LocalLayers`` at
``--split-layer``, ``--client-threads`` torch threads) in this process. Three request types, ``--prompts`` of
each, every prompt one user message through the model's chat template:

* ``chat``: the chat prompts of ``benchmarks/workloads/wire_prompts.json``;
* ``summarisation``: that file's summarisation prompts;
* ``code_edit``: "rename variable X to Y" in a short pure-Python function of the standard
  library (``inspect.getsource``; the function and the names are in the report).

Links: the default workload's networks (``benchmarks/workloads/default.json``: LAN, Wi-Fi,
4G), emulated by ``harness.emulation.EmulatedLink`` (every frame waits ``rtt/2 + 8 * bytes /
bandwidth`` in its direction). For each prompt and link, one session without drafts
(``draft="none"``) then one with prompt-lookup drafts (``draft="ngram"``, γ =
``--num-drafts``), one session at a time, greedy, ``ignore_eos`` off, ``--max-tokens``.
Per session: TPOT ((last - first token) / (n - 1); the tokens of one answer share its
arrival time), round trips (answers), tokens per round trip, drafts sent and accepted, the
decode rows sent (1 + drafts per activation) and so the server's decode layer-rows
(rows x (L - k)), checked against the step log's ``layer_rows`` of the session's decode
steps, and whether its tokens equal the same prompt's first session's (``mismatches``:
greedy output must not change with drafts or links).

Summary per (type, link, drafts): TPOT median and mean, tokens per round trip, acceptance,
layer-rows per output token; per (type, link): TPOT(off) / TPOT(on) as the ratio of the
sessions' mean TPOTs with a paired bootstrap 95% interval over the prompts, and the
issue's targets at the 4G link (50 ms round trip): at least 1.8x on summarisation and
code_edit, at least 1.0x on chat.
"""
from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report

TYPES = ("chat", "summarisation", "code_edit")
MODES = ("off", "on")
PROMPTS = report.ROOT / "benchmarks" / "workloads" / "wire_prompts.json"
WORKLOAD = report.ROOT / "benchmarks" / "workloads" / "default.json"
# short pure-Python standard-library functions (module, name) to edit
CODE_FUNCTIONS = (("textwrap", "indent"), ("fnmatch", "filter"), ("colorsys", "rgb_to_hsv"), ("html", "escape"),
                  ("calendar", "monthrange"), ("shlex", "quote"))
NEW_NAMES = ("value", "result", "items", "text", "data", "renamed")
TARGET_LINK = "4g"
TARGETS = {"chat": 1.0, "summarisation": 1.8, "code_edit": 1.8}  # TPOT(off) / TPOT(on) at TARGET_LINK


# ---------------------------------------------------------------- prompts (pure)
def rename_target(source: str) -> tuple[str, str]:
    """(old, new): the function's first local variable (else its first parameter) and a new
    name from ``NEW_NAMES`` that the source does not use."""
    func = ast.parse(source).body[0]
    names = [n for n in ast.walk(func) if isinstance(n, ast.Name)]
    stored = [n.id for n in sorted(names, key=lambda n: (n.lineno, n.col_offset)) if isinstance(n.ctx, ast.Store)]
    params = [a.arg for a in func.args.posonlyargs + func.args.args]
    if not stored and not params:
        raise ValueError(f"{func.name}: no variable to rename")
    old = (stored or params)[0]
    used = {n.id for n in names} | set(params)
    return old, next(n for n in NEW_NAMES if n not in used and n not in source)


def code_edit_prompt(source: str) -> tuple[str, str, str]:
    """(text, old, new): the request to rename a variable in ``source``."""
    old, new = rename_target(source)
    text = (f"Rename the variable `{old}` to `{new}` in this Python function. Reply with the whole edited "
            f"function only.\n\n```python\n{source.rstrip()}\n```")
    return text, old, new


def build_prompts(count: int, prompts_file: Path = PROMPTS) -> dict[str, list[dict]]:
    """``count`` prompts of each type: {type: [{name, text, ...}]} (text before the chat template)."""
    shipped = json.loads(Path(prompts_file).read_text())["prompts"]
    out = {t: [{"name": p["name"], "text": p["text"]} for p in shipped if p["kind"] == t][:count]
           for t in ("chat", "summarisation")}
    edits = []
    for module, name in CODE_FUNCTIONS[:count]:
        source = inspect.getsource(getattr(importlib.import_module(module), name))
        text, old, new = code_edit_prompt(source)
        edits.append({"name": f"{module}.{name}", "text": text, "rename": [old, new]})
    out["code_edit"] = edits
    for t in TYPES:
        if len(out[t]) < count:
            raise SystemExit(f"--prompts {count}: only {len(out[t])} {t} prompts available")
    return out


def prompt_ids(tokenizer, text: str) -> list[int]:
    """One user message through the model's chat template (the plain text without one)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  return_dict=False))
    return tokenizer(text)["input_ids"]


def load_links(workload: Path = WORKLOAD) -> dict[str, dict]:
    """The workload's networks: {name: {rtt_s, uplink_bps, downlink_bps}}."""
    return {n["name"]: {k: n[k] for k in ("rtt_s", "uplink_bps", "downlink_bps")}
            for n in json.loads(Path(workload).read_text())["networks"]}


# ---------------------------------------------------------------- one session (pure parts)
def decode_steps(steps: list[dict], num_prompt: int) -> list[dict]:
    """The step-log lines of one session after its prompt: the steps once ``num_prompt``
    tokens are scheduled (the prompt's chunks) are its decode (verification) steps."""
    seen, out = 0, []
    for s in steps:
        if seen >= num_prompt:
            out.append(s)
        seen += s.get("num_tokens", 0)
    return out


def session_row(stats, tokens: list[int], *, split_layer: int, num_layers: int, steps: list[dict] | None) -> dict:
    """The numbers of one finished session (``stats``: its ``GenerationStats``)."""
    n = len(tokens)
    activations = max(0, stats.round_trips - 1)  # every answer but the last one is answered by an activation
    rows = activations + stats.drafts_sent
    row = {"tokens": n, "finish_reason": stats.finish_reason, "prompt_tokens": stats.num_prompt_tokens,
           "tpot_s": stats.time_per_output_token, "ttft_s": stats.time_to_first_token,
           "round_trips": stats.round_trips, "drafts_sent": stats.drafts_sent,
           "drafts_accepted": stats.drafts_accepted, "decode_rows": rows,
           "decode_layer_rows": rows * (num_layers - split_layer)}
    if steps is not None:
        dec = decode_steps(steps, stats.num_prompt_tokens)
        counted = [s["layer_rows"] for s in dec if s.get("layer_rows") is not None]
        row.update(server_steps=len(steps), decode_steps=len(dec),
                   step_log_decode_layer_rows=sum(counted) if len(counted) == len(dec) else None)
    return row


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    """The first index where ``tokens`` differs from ``reference`` (None: equal)."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


# ---------------------------------------------------------------- summary (pure)
def paired_bootstrap_ratio(num: list[float], den: list[float], *, seed: int, n: int = 2000) -> list[float]:
    """95% percentile interval of mean(num) / mean(den), resampling the pairs (prompts) together."""
    if len(num) != len(den) or not num:
        raise ValueError("paired_bootstrap_ratio: expected two lists of the same, non-zero length")
    rng = random.Random(seed)
    idx = range(len(num))
    ratios = []
    for _ in range(n):
        pick = rng.choices(idx, k=len(num))
        ratios.append(sum(num[i] for i in pick) / sum(den[i] for i in pick))
    ratios.sort()
    return [ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]]


def cell_summary(rows: list[dict]) -> dict:
    """One (type, link, drafts) cell over its sessions."""
    tpots = [r["tpot_s"] for r in rows if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    sent = sum(r["drafts_sent"] for r in rows)
    step_rows = [r.get("step_log_decode_layer_rows") for r in rows]
    return {"sessions": len(rows), "output_tokens": tokens,
            "tpot_p50_s": statistics.median(tpots) if tpots else None,
            "tpot_mean_s": statistics.fmean(tpots) if tpots else None,
            "tokens_per_round_trip": tokens / sum(r["round_trips"] for r in rows),
            "drafts_sent": sent, "drafts_accepted": sum(r["drafts_accepted"] for r in rows),
            "acceptance": sum(r["drafts_accepted"] for r in rows) / sent if sent else None,
            "layer_rows_per_token": sum(r["decode_layer_rows"] for r in rows) / tokens,
            "step_log_layer_rows_per_token": (sum(step_rows) / tokens if step_rows and None not in step_rows
                                              else None),
            "mismatches": sum(r["first_difference"] is not None for r in rows)}


def summarize(rows: list[dict], seed: int) -> dict:
    """{"cells": {type: {link: {off, on, tpot_ratio, tpot_ratio_ci95, ...}}}, "targets", "mismatches"}."""
    cells: dict = {}
    for t in dict.fromkeys(r["type"] for r in rows):
        for link in dict.fromkeys(r["link"] for r in rows if r["type"] == t):
            mine = [r for r in rows if r["type"] == t and r["link"] == link]
            c = {m: cell_summary([r for r in mine if r["mode"] == m]) for m in MODES
                 if any(r["mode"] == m for r in mine)}
            pairs = paired_tpots(mine)
            if pairs:
                off, on = zip(*pairs)
                c["tpot_ratio"] = sum(off) / sum(on)
                c["tpot_ratio_ci95"] = paired_bootstrap_ratio(list(off), list(on), seed=seed)
                c["tpot_ratio_p50"] = statistics.median(off) / statistics.median(on)
            if "off" in c and "on" in c:
                c["layer_rows_ratio"] = c["on"]["layer_rows_per_token"] / c["off"]["layer_rows_per_token"]
            cells.setdefault(t, {})[link] = c
    targets = {}
    for t, want in TARGETS.items():
        c = cells.get(t, {}).get(TARGET_LINK, {})
        if "tpot_ratio" in c:
            lo, _ = c["tpot_ratio_ci95"]
            targets[t] = {"link": TARGET_LINK, "want_at_least": want, "tpot_ratio": c["tpot_ratio"],
                          "met": c["tpot_ratio"] >= want, "met_by_ci_low": lo >= want}
    return {"cells": cells, "targets": targets, "mismatches": sum(r["first_difference"] is not None for r in rows)}


def rounded(obj, digits: int = 4):
    """``obj`` with every float to ``digits`` significant digits (results/ stays small)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def paired_tpots(rows: list[dict]) -> list[tuple[float, float]]:
    """(TPOT off, TPOT on) of each prompt that has both."""
    by_prompt: dict = {}
    for r in rows:
        if r["tpot_s"] is not None:
            by_prompt.setdefault(r["prompt"], {})[r["mode"]] = r["tpot_s"]
    return [(p["off"], p["on"]) for p in by_prompt.values() if "off" in p and "on" in p]


# ---------------------------------------------------------------- plot
def draw(data: dict):
    cells = data["summary"]["cells"]
    types = [t for t in TYPES if t in cells]
    links = list(data["links"])
    fig, (a1, a2, a3) = report.subplots(1, 3, figsize=(12, 3.6))
    width = 0.8 / max(1, len(links))
    for j, link in enumerate(links):
        xs = [i + (j - (len(links) - 1) / 2) * width for i in range(len(types))]
        got = [cells[t].get(link, {}) for t in types]
        ratio = [c.get("tpot_ratio", float("nan")) for c in got]
        ci = [c.get("tpot_ratio_ci95", [r, r]) for c, r in zip(got, ratio)]
        a1.bar(xs, ratio, width, label=f"{link} ({data['links'][link]['rtt_s'] * 1e3:g} ms)",
               yerr=[[r - lo for r, (lo, _) in zip(ratio, ci)], [hi - r for r, (_, hi) in zip(ratio, ci)]],
               capsize=2)
        a2.bar(xs, [c.get("on", {}).get("tokens_per_round_trip", float("nan")) for c in got], width, label=link)
        a3.bar(xs, [c.get("on", {}).get("tpot_p50_s", float("nan")) * 1e3 for c in got], width, label=f"{link} on")
        a3.scatter(xs, [c.get("off", {}).get("tpot_p50_s", float("nan")) * 1e3 for c in got], marker="_", s=120,
                   c="k", zorder=3, label="without drafts" if j == 0 else None)
    for a in (a1, a2, a3):
        a.set_xticks(range(len(types)), types)
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.axhline(TARGETS["summarisation"], color="red", lw=0.8, ls="--")
    a1.set_ylabel("TPOT without / with drafts")
    a1.legend(fontsize=7)
    a2.set_ylabel("tokens per round trip (drafts on)")
    a3.set_ylabel("TPOT p50, ms (bars: drafts, dash: none)")
    for a in (a1, a3):  # room for the legend above the bars
        a.set_ylim(0, a.get_ylim()[1] * 1.3)
    a3.legend(fontsize=7, ncols=2)
    args = data["arguments"]
    fig.suptitle(f"n-gram drafts (γ = {args['num_drafts']}) at k = {args['split_layer']}, "
                 f"{args['prompts']} prompts per type, {args['max_tokens']} tokens max", fontsize=10)
    return fig


def quantize_png(path: Path) -> None:
    """The plot in 256 colours (results/ stays small)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


# ---------------------------------------------------------------- the run
def step_lines(path: Path, start: int) -> tuple[list[dict], int]:
    """The step log's lines from byte ``start`` on (the engine's split steps) and the new offset."""
    if not path.exists():
        return [], start
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read()
    end = raw.rfind(b"\n") + 1  # a line still being written waits for the next read
    lines = [json.loads(x) for x in raw[:end].splitlines() if x.strip()]
    return [s for s in lines if s.get("split_requests")], start + end


async def one_session(url: str, layers, ids: list[int], *, link, max_tokens: int, draft: str, num_drafts: int,
                      wire_dtype: str | None = None):
    from client_lib.session import SplitSession
    from vllm_split.wire import protocol as wire

    async with await SplitSession.create(url, layers, sampling=wire.SamplingOptions(max_tokens=max_tokens),
                                         link=link, draft=draft, num_drafts=num_drafts,
                                         wire_dtype=wire_dtype) as session:
        tokens = [e.token_id async for e in session.generate(ids)]
    return session, tokens


def main() -> None:
    p = report.parser("bench_drafts", __doc__, quick="1 prompt per type, 16 tokens", seed=0, plot=True)
    p.add_argument("--prompts", type=int, default=5, help="prompts per request type (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--split-layer", type=int, default=15)
    p.add_argument("--num-drafts", type=int, default=4, help="γ: the client's drafts per activation and the "
                   "server's --split-drafts (default: %(default)s)")
    p.add_argument("--client-threads", type=int, default=1, help="torch threads of the client's layers "
                   "(default: %(default)s)")
    p.add_argument("--wire-dtype", default=None, help="the sessions' wire dtype (default: the rows' own, float32)")
    p.add_argument("--links", default=None, help="comma-separated subset of the workload's networks (default: all)")
    p.add_argument("--split-args", nargs="*", default=[], help="extra vllm-split serve arguments")
    args = p.parse_args()
    if args.plot_only:  # report.parse_args's redraw, then the colours cut like a run's
        quantize_png(report.plot(args.out, draw))
        return
    if args.quick:
        args.prompts, args.max_tokens = 1, 16
    import torch

    torch.set_num_threads(args.client_threads)  # a modest client device
    from transformers import AutoTokenizer

    from client_lib.local_layers import LocalLayers
    from harness.emulation import EmulatedLink
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer
    from vllm_split.engine.step_timing import ENV as STEP_LOG_ENV

    model = prepare()
    links = load_links()
    if args.links:
        links = {k: links[k] for k in args.links.split(",")}
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = build_prompts(args.prompts)
    for group in prompts.values():
        for q in group:
            q["ids"] = prompt_ids(tokenizer, q["text"])
    layers = LocalLayers(model, split_layer=args.split_layer)
    tmp = Path(tempfile.mkdtemp(prefix="bench-drafts-"))
    step_log = tmp / "steps.jsonl"
    print(f"[bench] logs in {tmp}", flush=True)
    extra = ("--no-enable-prefix-caching", "--split-drafts", str(args.num_drafts), *args.split_args)
    rows: list[dict] = []
    references: dict[str, list[int]] = {}
    granted = set()
    t_start = time.perf_counter()
    with VLLMServer(model, split=True, log_path=tmp / "server.log", extra_args=extra,
                    env={STEP_LOG_ENV: str(step_log)}) as server:
        for t in TYPES:  # warm-up: compile and run the shapes of both modes
            for draft in ("none", "ngram"):
                asyncio.run(one_session(server.url, layers, prompts[t][0]["ids"], link=None, max_tokens=8,
                                        draft=draft, num_drafts=args.num_drafts, wire_dtype=args.wire_dtype))
        _, offset = step_lines(step_log, 0)
        for i in range(args.prompts):
            for t in TYPES:
                q = prompts[t][i]
                for name, net in links.items():
                    link = EmulatedLink(**net)
                    for mode in MODES:
                        session, tokens = asyncio.run(one_session(
                            server.url, layers, q["ids"], link=link, max_tokens=args.max_tokens,
                            draft="ngram" if mode == "on" else "none", num_drafts=args.num_drafts,
                            wire_dtype=args.wire_dtype))
                        time.sleep(0.2)  # the session's last step line lands
                        steps, offset = step_lines(step_log, offset)
                        if mode == "on":
                            granted.add(session.granted_drafts)
                        row = session_row(session.stats, tokens, split_layer=args.split_layer,
                                          num_layers=layers.num_layers, steps=steps)
                        reference = references.setdefault(q["name"], tokens)
                        row.update(type=t, prompt=q["name"], link=name, mode=mode,
                                   first_difference=first_difference(tokens, reference))
                        rows.append(row)
                        print(f"  {t} {q['name']} {name} {mode}: {row['tokens']} tokens, TPOT "
                              f"{(row['tpot_s'] or float('nan')) * 1e3:.1f} ms, "
                              f"{row['tokens'] / row['round_trips']:.2f} tok/rt, drafts {row['drafts_accepted']}/"
                              f"{row['drafts_sent']}, diff {row['first_difference']}", flush=True)
    summary = summarize(rows, args.seed)
    summary["granted_drafts"] = sorted(granted)
    data = {"arguments": report.arguments(args),
            "environment": report.environment(model=model.name, num_layers=layers.num_layers),
            "links": links, "server_args": list(extra), "wall_s": round(time.perf_counter() - t_start, 1),
            "prompts": {t: [{"name": q["name"], "prompt_tokens": len(q["ids"]),
                             **({"rename": q["rename"]} if "rename" in q else {})} for q in group]
                        for t, group in prompts.items()},
            "summary": rounded(summary)}
    report.write(args.out, data, rows={"sessions": rounded(rows)}, draw=draw, indent=None)
    quantize_png(args.out.with_suffix(".png"))
    print(json.dumps({t: {link: {k: c.get(k) for k in ("tpot_ratio", "tpot_ratio_ci95")}
                          for link, c in v.items()} for t, v in summary["cells"].items()}, indent=1))
    print(json.dumps(summary["targets"], indent=1), f"mismatches {summary['mismatches']}")


if __name__ == "__main__":
    main()
