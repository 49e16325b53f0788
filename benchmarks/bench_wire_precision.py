"""Wire precision: how much accuracy each activation wire format costs, per split layer.

The client runs layers [0, k) exactly and sends the hidden state entering layer k; only
what goes on the wire is rounded, so the server's layers [k, L), and the KV cache it
builds for them, see the decoded values. This benchmark reproduces that with the real
model in transformers (float32, CPU, one thread; no vLLM, no server): a forward pre-hook
on decoder layer k passes the hidden state of every prompt position and every decoded
token through encode -> decode of the wire format, for one batch element per
(format, k), beside an unrounded float32 reference element in the same batch.

Per (format, k), over the prompts of ``--prompts`` (chat template, greedy, ``--tokens``
new tokens, compared up to the reference's end of sequence):

* ``token_match_rate``: share of the free-running greedy tokens equal, position by
  position, to the float32 reference's;
* ``first_divergence``: the first position that differs (``--tokens`` when none), median
  and min over the prompts;
* ``kl_mean``: KL(reference || format) of the next-token distribution, mean over the
  teacher-forced positions (prompt + reference tokens, one forward pass), and
  ``tf_top1_agreement``, the share of those positions with the reference's top token;
* ``bytes_per_token``: the bytes one prompt token's row costs on the wire (payload and
  scales), measured on the encoded prompt frames.

Greedy decoding of a small model meets near-ties (top-1 and top-2 within a hundredth of a
nat), where any rounding may pick the other token and the rest of the answer differs: the
reference's top-1 margin at each first divergence is recorded to show it, and KL is the
steadier figure. ``--outlier-counts`` adds ``int8_mixed`` variants sending other numbers
of values per row exactly (``int8_mixedN``), the runs that sized ``MIXED_OUTLIERS``.

Writes JSON (arguments, environment, per-(format, k) results, summary; per-prompt samples
in the compressed sidecar ``NAME.rows.json.gz``) and a plot: token match rate and KL
against k, per format.

    python -m benchmarks.bench_wire_precision            # -> results/bench_wire_precision.json
    python -m benchmarks.bench_wire_precision --quick    # CI smoke run (2 prompts, 8 tokens, 2 ks)
    python -m benchmarks.bench_wire_precision --formats int8_mixed --outlier-counts 2,4,16 \
        --out results/bench_wire_precision_outliers.json  # sizing MIXED_OUTLIERS
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks import report
from vllm_split.wire import quant
from vllm_split.wire.protocol import TENSOR_DTYPES, encode_tensor

PLAIN = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("float32", "float16", "bfloat16", "int8_row", "int8_mixed", "fp8_e4m3")
PROMPTS = report.ROOT / "benchmarks" / "workloads" / "wire_prompts.json"


def add_outlier_variants(counts: list[int]) -> list[str]:
    """Benchmark-only formats ``int8_mixedN``: ``int8_mixed`` sending ``N`` values per row
    exactly, to size :data:`quant.MIXED_OUTLIERS` by the numbers. Returns their names."""
    names = []
    for n in counts:
        name = f"int8_mixed{n}"
        quant.FORMATS.setdefault(name, dataclasses.replace(quant.FORMATS["int8_mixed"], num_outliers=n))
        names.append(name)
    return names


def wire_roundtrip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the server decodes from rows ``x`` [rows, hidden] sent in ``fmt`` (float32)."""
    if fmt in PLAIN:
        return x.to(PLAIN[fmt]).to(x.dtype)
    return quant.roundtrip(x, fmt)


def wire_bytes(x: torch.Tensor, fmt: str) -> int:
    """Bytes of the frame body that carries rows ``x`` in ``fmt`` (payload + scales)."""
    if fmt in PLAIN:
        return len(encode_tensor(x.to(PLAIN[fmt]))[2])
    return quant.encode(x, fmt).num_bytes


def formula_bytes_per_row(fmt: str, hidden: int) -> int:
    return TENSOR_DTYPES[fmt] * hidden if fmt in PLAIN else quant.bytes_per_row(fmt, hidden)


class WireHooks:
    """Pre-hooks on the split layers: batch element ``e`` = ``variants[e]`` = (format, k)
    has the hidden state entering layer k passed through the format; ``(None, None)`` is
    the unrounded reference. Also counts the frames' bytes and rows (prompt frames only)."""

    def __init__(self, layers: torch.nn.ModuleList, variants: list[tuple[str | None, int | None]]) -> None:
        self.variants = variants
        self.count_bytes = False
        self.bytes: dict[tuple[str, int], list[int]] = {}  # (fmt, k) -> [bytes, rows]
        self.handles = [layers[k].register_forward_pre_hook(self._hook(k), with_kwargs=True)
                        for k in sorted({k for _, k in variants if k is not None})]

    def _hook(self, k: int):
        def hook(module, args, kwargs):
            hidden = args[0].clone()
            for e, (fmt, split) in enumerate(self.variants):
                if split == k:
                    hidden[e] = wire_roundtrip(args[0][e], fmt)
                    if self.count_bytes:
                        acc = self.bytes.setdefault((fmt, k), [0, 0])
                        acc[0] += wire_bytes(args[0][e], fmt)
                        acc[1] += args[0].shape[1]
            return (hidden, *args[1:]), kwargs
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_prompt(model, hooks: WireHooks, prompt_ids: list[int], tokens: int, eos: set[int]) -> dict:
    """Greedy-generate ``tokens`` tokens per variant (free running), then one teacher-forced
    pass over prompt + the reference's tokens; per-variant match, divergence, KL."""
    from transformers import DynamicCache

    batch = len(hooks.variants)
    ids = torch.tensor([prompt_ids] * batch)
    cache = DynamicCache(config=model.config)
    hooks.count_bytes = True
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    hooks.count_bytes = False
    out = [logits[:, -1].argmax(-1)]
    for _ in range(tokens - 1):
        logits = model(input_ids=out[-1][:, None], past_key_values=cache, use_cache=True).logits
        out.append(logits[:, -1].argmax(-1))
    gen = torch.stack(out, dim=1)  # [batch, tokens]
    ref = gen[0].tolist()
    n = next((i + 1 for i, t in enumerate(ref) if t in eos), tokens)  # compare up to the reference's EOS
    forced = torch.tensor([prompt_ids + ref[: n - 1]] * batch)
    logp = model(input_ids=forced, logits_to_keep=n).logits.float().log_softmax(-1)  # [batch, n, vocab]
    p_ref = logp[0].exp()
    top2 = logp[0].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()  # the reference's top-1 over top-2 log-prob, per position
    samples = []
    for e in range(batch):
        same = (gen[e, :n] == gen[0, :n]).tolist()
        first = same.index(False) if False in same else tokens
        kl = (p_ref * (logp[0] - logp[e])).sum(-1)
        samples.append({"match": sum(same) / n, "first_divergence": first,
                        "reference_margin_at_divergence": margin[first] if first < n else None,
                        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                        "tf_top1": float((logp[e].argmax(-1) == logp[0].argmax(-1)).float().mean())})
    self_agree = float((logp[0].argmax(-1) == gen[0, :n]).float().mean())
    return {"compared_tokens": n, "reference_tf_self_agreement": self_agree, "samples": samples,
            "reference_tokens": ref}


def summarise(variants, per_prompt: list[dict], byte_counts: dict, hidden: int, tokens: int) -> list[dict]:
    results = []
    for e, (fmt, k) in enumerate(variants):
        if fmt is None:
            continue
        s = [p["samples"][e] for p in per_prompt]
        first = [x["first_divergence"] for x in s]
        margins = [x["reference_margin_at_divergence"] for x in s if x["reference_margin_at_divergence"] is not None]
        b, rows = byte_counts[(fmt, k)]
        results.append({"format": fmt, "split_layer": k,
                        "token_match_rate": statistics.fmean(x["match"] for x in s),
                        "first_divergence_median": statistics.median(first), "first_divergence_min": min(first),
                        "prompts_without_divergence": sum(f == tokens for f in first),
                        "reference_margin_at_divergence_median": statistics.median(margins) if margins else None,
                        "kl_mean": statistics.fmean(x["kl_mean"] for x in s),
                        "kl_max": max(x["kl_max"] for x in s),
                        "tf_top1_agreement": statistics.fmean(x["tf_top1"] for x in s),
                        "bytes_per_token": b / rows, "bytes_per_token_formula": formula_bytes_per_row(fmt, hidden)})
    return results


def load_prompts(path: Path, tokenizer, count: int | None) -> list[dict]:
    prompts = json.loads(path.read_text())["prompts"][:count]
    for p in prompts:
        messages = [{"role": "user", "content": p["text"]}]
        p["ids"] = (tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
                    if tokenizer.chat_template else tokenizer(p["text"])["input_ids"])
    return prompts


def main() -> None:
    from harness.model_prep import model_dir as default_model_dir

    p = report.parser("bench_wire_precision", __doc__, quick="2 prompts, 8 tokens, split layers 1 and 15",
                      plot=True)
    p.add_argument("--model", type=Path, default=default_model_dir(),
                   help="HF model folder (default: the prepared SmolLM2)")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="prompts JSON (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default: %(default)s)")
    p.add_argument("--split-layers", default="1,7,15,29", help="comma-separated k (default: %(default)s)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated wire formats (default: %(default)s)")
    p.add_argument("--outlier-counts", default="",
                   help=f"also run int8_mixed sending these numbers of values per row exactly (formats int8_mixedN; "
                        f"int8_mixed itself sends {quant.MIXED_OUTLIERS}), e.g. 2,4,16 (default: none)")
    args = report.parse_args(p, draw)
    if args.quick:
        args.num_prompts, args.tokens, args.split_layers, args.outlier_counts = 2, 8, "1,15", ""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (args.model / "config.json").exists():
        raise SystemExit(f"--model {args.model}: no config.json; prepare the model with `python -m harness.model_prep`")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    ks = [int(k) for k in args.split_layers.split(",")]
    if not all(0 <= k < num_layers for k in ks):
        raise SystemExit(f"--split-layers {args.split_layers}: expected values in [0, {num_layers})")
    wanted = args.formats.split(",") + add_outlier_variants([int(n) for n in args.outlier_counts.split(",") if n])
    known = set(PLAIN) | {f for f in quant.FORMATS if quant.can_encode(f)}
    formats = [f for f in wanted if f in known]
    skipped = [f for f in wanted if f not in known]
    if skipped:
        print(f"skipping formats this torch cannot encode or does not know: {skipped}", flush=True)
    variants = [(None, None)] + [(f, k) for k in ks for f in formats]
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])} - {None}
    prompts = load_prompts(args.prompts, tokenizer, args.num_prompts)
    hooks = WireHooks(model.model.layers, variants)
    per_prompt, t0 = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        result = run_prompt(model, hooks, prompt["ids"], args.tokens, eos)
        per_prompt.append({"name": prompt["name"], "kind": prompt["kind"], "prompt_tokens": len(prompt["ids"]),
                           **result})
        print(f"[{i + 1}/{len(prompts)}] {prompt['name']}: {len(prompt['ids'])} prompt tokens, "
              f"{result['compared_tokens']} compared [{time.perf_counter() - t0:.0f} s]", flush=True)
    hooks.remove()
    results = summarise(variants, per_prompt, hooks.bytes, hidden, args.tokens)
    for r in results:
        print(f"{r['format']:>10} k={r['split_layer']:<3} match {r['token_match_rate']:.3f}  first div "
              f"median {r['first_divergence_median']:>5} min {r['first_divergence_min']:>3}  KL {r['kl_mean']:.2e}  "
              f"{r['bytes_per_token']:.0f} B/token", flush=True)
    variant_names = [f"{f}@{k}" if f else "reference" for f, k in variants]
    data = {"arguments": report.arguments(args), "environment": report.environment(),
            "model": {"name": args.model.name, "num_layers": num_layers, "hidden_size": hidden},
            "formats": formats, "split_layers": ks, "tokens": args.tokens,
            "prompts": {"count": len(prompts), "mean_prompt_tokens": statistics.fmean(len(p["ids"]) for p in prompts),
                        "reference_eos_within_tokens": sum(r["compared_tokens"] < args.tokens for r in per_prompt)},
            "reference_tf_self_agreement": min(r["reference_tf_self_agreement"] for r in per_prompt),
            "results": results, "summary": summary(results), "seconds": time.perf_counter() - t0}
    report.write(args.out, data, rows={"variants": variant_names, "per_prompt": per_prompt}, draw=draw)
    print(f"wrote {args.out}", flush=True)


def summary(results: list[dict]) -> dict:
    """Per format: its worst token match rate and first divergence over k, mean KL, bytes."""
    out = {}
    for fmt in dict.fromkeys(r["format"] for r in results):
        rs = [r for r in results if r["format"] == fmt]
        out[fmt] = {"min_token_match_rate": min(r["token_match_rate"] for r in rs),
                    "mean_token_match_rate": statistics.fmean(r["token_match_rate"] for r in rs),
                    "min_first_divergence_median": min(r["first_divergence_median"] for r in rs),
                    "min_tf_top1_agreement": min(r["tf_top1_agreement"] for r in rs),
                    "mean_kl": statistics.fmean(r["kl_mean"] for r in rs),
                    "max_kl": max(r["kl_mean"] for r in rs),
                    "bytes_per_token": rs[0]["bytes_per_token"]}
    return out


def draw(data: dict):
    fig, (ax1, ax2) = report.subplots(1, 2, figsize=(11, 4))
    for i, fmt in enumerate(data["formats"]):
        rs = sorted((r for r in data["results"] if r["format"] == fmt), key=lambda r: r["split_layer"])
        ks = [r["split_layer"] for r in rs]
        label = f"{fmt} ({rs[0]['bytes_per_token']:.0f} B/token)"
        style = {"marker": "o", "label": label, "color": f"C{i}",  # the same colour in both panels
                 "linestyle": ":" if fmt.startswith("int8_mixed") and fmt != "int8_mixed" else "-"}  # sizing: dotted
        ax1.plot(ks, [r["token_match_rate"] for r in rs], **style)
        if any(r["kl_mean"] > 0 for r in rs):  # float32 is the reference: KL 0, off a log axis
            ax2.plot(ks, [r["kl_mean"] for r in rs], **style)
    ax1.set(xlabel="split layer k", ylabel="greedy token match rate vs float32",
            title=f"{data['prompts']['count']} prompts x {data['tokens']} tokens")
    ax2.set(xlabel="split layer k", ylabel="mean KL(float32 || format), teacher-forced", yscale="log",
            title=data["model"]["name"])
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    main()
