"""Privacy: how much of the text an attacker on the server recovers from the activations it sees.

With split inference the server receives, for every prompt and output position, the hidden
state entering layer k (the residual stream, before any norm, what ``LocalLayers``
sends; k = 0 is the embedding output); in the U shape it would also return the hidden
state entering layer m. This benchmark measures token recovery from that state for a grid
of layers (covering both k and m), with the real model in transformers (float32, CPU; no
vLLM, no server, nothing downloaded), on text the project can ship or make:

* ``stdlib``: docstrings of a fixed list of Python standard-library modules (the PSF's
  text, in this interpreter), cut into documents of ``--doc-tokens`` tokens;
* ``generated``: the model's own answers to the prompts of ``wire_prompts.json``
  (``--samples`` seeded samples each, temperature ``--temperature``), each document the
  prompt's text and the answer as plain text (no chat template).

Documents are split train / held-out by source document (a module; a prompt with all its
samples), never by token. Three attacks, each scored on held-out positions:

* ``frequency``: the baseline, the most frequent training tokens, whatever the activation;
* ``probe``: a linear classifier (standardised activation -> token), trained with
  cross-entropy (Adam) on every training position; its classes are the tokens that occur
  in the training text (no "other" class: it would have no training example), so a
  held-out token outside them is always a miss;
* ``nearest_neighbour``: the attacker knows the public weights and the true prefix (the
  "oracle prefix", stronger than a recovered one): for each candidate token it runs the
  client's own first k layers (``LocalLayers``) on prefix + candidate and picks the
  candidate whose layer-k state is nearest (L2) to the observed one. Candidates: every
  token of the vocabulary at k = 0 (the state is a row of the embedding table), the
  probe's top ``--candidates`` classes above. The prefix's KV cache is shared: the
  candidates run as one batch at the same position, masked to see the prefix and
  themselves only. ``--nn-positions`` held-out positions, the same ones at every layer.
  Also scored on the observed state after ``int8_row`` (the coarsest 8-bit wire format).

Writes JSON (arguments, environment, corpus sizes and sources, per-(attack, layer) top-1
and top-5 recovery with Wilson 95% intervals, summary; the documents' token ids and the
attacks' per-position guesses in the compressed sidecar ``NAME.rows.json.gz``) and a plot:
recovery against layer, per attack.

    python -m benchmarks.privacy_inversion            # -> results/privacy_inversion.json
    python -m benchmarks.privacy_inversion --quick    # CI smoke run (stdlib text only, k 0 and 7)
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import platform
import random
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.throughput_stats import wilson
from vllm_split.wire import quant

WIRE = "int8_row"  # the coarsest 8-bit wire format: the nearest neighbour is also scored on states it rounded
PROMPTS = report.ROOT / "benchmarks" / "workloads" / "wire_prompts.json"
STDLIB_MODULES = (
    "argparse", "asyncio.tasks", "base64", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "difflib", "email.message", "enum", "fileinput", "ftplib", "functools", "getopt", "gzip",
    "heapq", "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "mimetypes",
    "optparse", "os", "pkgutil", "platform", "poplib", "re", "shelve", "shutil", "smtplib", "socketserver",
    "statistics", "subprocess", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "urllib.parse", "urllib.request", "uuid", "wave", "zipfile")


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    source: str  # "stdlib" or "generated"
    group: str   # the unit of the train / held-out split: a module, a prompt
    ids: list[int]


def module_text(name: str) -> str:
    """A module's docstring, then its public classes' and functions' (sorted by name)."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if not attr.startswith("_") and getattr(obj, "__module__", None) == name and (
                inspect.isclass(obj) or inspect.isfunction(obj)) and inspect.getdoc(obj):
            parts.append(f"{attr}: {inspect.getdoc(obj)}")
    return "\n\n".join(p for p in parts if p)


def stdlib_documents(tokenizer, modules, doc_tokens: int) -> list[Document]:
    """Each module's text cut into documents of ``doc_tokens`` tokens (the last may be shorter)."""
    docs = []
    for name in modules:
        ids = tokenizer(module_text(name))["input_ids"]
        docs += [Document("stdlib", name, ids[i: i + doc_tokens]) for i in range(0, len(ids), doc_tokens)
                 if len(ids[i: i + doc_tokens]) >= 16]
    return docs


@torch.no_grad()
def generated_documents(lm, tokenizer, prompts: list[dict], *, samples: int, tokens: int, temperature: float,
                        seed: int) -> list[Document]:
    """The model's sampled answers (chat template in, plain text out), one batch per sample."""
    tokenizer.padding_side = "left"
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    docs = []
    for s in range(samples):
        torch.manual_seed(seed + s)
        out = lm.generate(**batch, max_new_tokens=tokens, do_sample=True, temperature=temperature, top_p=0.95,
                          pad_token_id=tokenizer.pad_token_id)
        for p, row in zip(prompts, out[:, batch["input_ids"].shape[1]:]):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            docs.append(Document("generated", p["name"], tokenizer(f"{p['text']}\n\n{answer}")["input_ids"]))
    return docs


def split_documents(docs: list[Document], held_out: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Train / held-out documents: a seeded ``held_out`` share of each source's groups is
    held out, all documents of a group on one side."""
    test_groups = set()
    for source in sorted({d.source for d in docs}):
        groups = sorted({d.group for d in docs if d.source == source})
        random.Random(f"{seed}/{source}").shuffle(groups)
        test_groups |= {(source, g) for g in groups[: max(1, round(held_out * len(groups)))]}
    return ([d for d in docs if (d.source, d.group) not in test_groups],
            [d for d in docs if (d.source, d.group) in test_groups])


@torch.no_grad()
def extract(local, docs: list[Document], layers: list[int]) -> dict[int, torch.Tensor]:
    """The hidden state entering each of ``layers`` at every position of ``docs``, in order:
    ``{layer: [positions, hidden]}``. ``local`` holds every layer with no final norm, so
    state ``L`` is the residual stream before the norm, like every other."""
    acts: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for doc in docs:
        states = local.model(input_ids=torch.tensor([doc.ids]), output_hidden_states=True).hidden_states
        for k in layers:
            acts[k].append(states[k][0])
    return {k: torch.cat(v) for k, v in acts.items()}


@dataclasses.dataclass(slots=True)
class Probe:
    """Linear classifier over ``classes`` (token ids) of the standardised activation."""
    classes: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    linear: torch.nn.Linear

    @torch.no_grad()
    def top(self, x: torch.Tensor, n: int, batch: int = 4096) -> torch.Tensor:
        """The ``n`` likeliest token ids per row of ``x``: ``[rows, n]``."""
        n = min(n, len(self.classes))
        idx = [self.linear((x[i: i + batch] - self.mean) / self.std).topk(n, dim=-1).indices
               for i in range(0, len(x), batch)]
        return self.classes[torch.cat(idx)]


def train_probe(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int) -> Probe:
    """Cross-entropy (Adam, minibatches) over the tokens that occur in ``y``."""
    classes, target = torch.unique(y, return_inverse=True)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(linear(xs[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return Probe(classes, mean, std, linear.eval())


@torch.no_grad()
def nearest_neighbour(local, *, docs: list[Document], positions: list[tuple[int, int]], observed: torch.Tensor,
                      candidates: torch.Tensor | None, rounded: torch.Tensor) -> list[dict]:
    """For each held-out ``positions[j]`` = (document, position) with the true prefix, the
    candidates (row j of ``candidates``; None: the whole vocabulary, layer 0 only) ranked
    by the L2 distance of their layer-k state (``local`` runs layers [0, k)) to
    ``observed[j]``. Per position: the guess, the true token's rank (None when it is not a
    candidate), the distances of the true token and the nearest other candidate, and the
    true token's rank when the server saw ``rounded[j]`` (the state after a lossy wire
    format) instead."""
    from transformers import DynamicCache

    k = local.split_layer
    out: list[dict | None] = [None] * len(positions)
    by_doc: dict[int, list[int]] = {}
    for j, (d, _) in enumerate(positions):
        by_doc.setdefault(d, []).append(j)
    for d, js in by_doc.items():
        ids = torch.tensor(docs[d].ids)
        js.sort(key=lambda j: -positions[j][1])  # descending: each crop only shortens the prefix cache
        cache = DynamicCache()
        if k > 0 and positions[js[0]][1] > 0:
            local.model(input_ids=ids[None, : positions[js[0]][1]], past_key_values=cache, use_cache=True)
        for j in js:
            i = positions[j][1]
            if k == 0:
                cand, states = torch.arange(local.model.embed_tokens.num_embeddings), local.model.embed_tokens.weight
            else:
                if cache.get_seq_length() > i:
                    cache.crop(i - cache.get_seq_length())  # negative: drop that many positions
                cand, n = candidates[j], len(candidates[j])
                mask = torch.zeros(1, 1, n, i + n, dtype=torch.bool)  # each candidate sees the prefix and itself
                mask[..., :i] = True
                mask[0, 0, torch.arange(n), i + torch.arange(n)] = True
                states = local.model(input_ids=cand[None], attention_mask=mask, position_ids=torch.full((1, n), i),
                                     past_key_values=cache, use_cache=True).last_hidden_state[0]
            dist = (states - observed[j]).norm(dim=-1)
            order = dist.argsort()
            true = int(ids[i])
            hit = (cand[order] == true).nonzero()
            wrong = dist[cand != true]
            rounded_hit = (cand[(states - rounded[j]).norm(dim=-1).argsort()] == true).nonzero()
            out[j] = {"guess": int(cand[order[0]]), "rank": int(hit[0, 0]) if len(hit) else None,
                      "rounded_rank": int(rounded_hit[0, 0]) if len(rounded_hit) else None,
                      "rounding_distance": float((rounded[j] - observed[j]).norm()),
                      "true_distance": float(dist[cand == true][0]) if len(hit) else None,
                      "nearest_other_distance": float(wrong.min()) if len(wrong) else None,
                      "norm": float(observed[j].norm())}
    return out


def score(name: str, layer: int | None, ranks: list[int | None], **extra) -> dict:
    """Top-1 and top-5 recovery with Wilson 95% intervals from each position's rank of the
    true token (None: not among the guesses)."""
    n = len(ranks)
    top1, top5 = sum(r == 0 for r in ranks), sum(r is not None and r < 5 for r in ranks)
    return {"attack": name, "layer": layer, "positions": n, "top1": top1 / n, "top1_ci95": wilson(top1, n),
            "top5": top5 / n, "top5_ci95": wilson(top5, n), **extra}


def rank_of(guesses: torch.Tensor, truth: torch.Tensor) -> list[int | None]:
    """Per row, the index of ``truth`` in ``guesses`` [rows, n] (None when absent)."""
    hit = guesses == truth[:, None]
    return [int(h.nonzero()[0, 0]) if h.any() else None for h in hit]


def nn_entry(layer: int, found: list[dict], *, candidates: str, wire: str, seconds: float) -> dict:
    """The nearest neighbour's score at ``layer``: recovery (also on ``wire``-rounded
    states), how often the true token was a candidate, and the distances relative to the
    observed state's norm."""
    def median_rel(key):
        rel = sorted(f[key] / f["norm"] for f in found if f[key] is not None)
        return rel[len(rel) // 2] if rel else None
    rounded = sum(f["rounded_rank"] == 0 for f in found)
    return score("nearest_neighbour", layer, [f["rank"] for f in found], candidates=candidates,
                 **{f"top1_{wire}_wire": rounded / len(found), f"top1_{wire}_wire_ci95": wilson(rounded, len(found))},
                 candidate_coverage=sum(f["rank"] is not None for f in found) / len(found),
                 true_distance_rel_median=median_rel("true_distance"),
                 true_distance_rel_max=max((f["true_distance"] / f["norm"] for f in found
                                            if f["true_distance"] is not None), default=None),
                 nearest_other_distance_rel_median=median_rel("nearest_other_distance"),
                 **{f"{wire}_rounding_rel_median": median_rel("rounding_distance")},
                 seconds_per_position=seconds / len(found))


def parse_arguments():
    from harness.model_prep import model_dir as default_model_dir

    p = report.parser("privacy_inversion", __doc__, quick="stdlib text of 12 modules, layers 0 and 7, "
                      "16 nearest-neighbour positions of 8 candidates", seed=0, plot=True)
    p.add_argument("--model", type=Path, default=default_model_dir(),
                   help="HF model folder (default: the prepared SmolLM2)")
    p.add_argument("--layers", default="0,1,2,4,7,11,15,22,29,30",
                   help="comma-separated layers whose input state is attacked, 0..L (default: %(default)s)")
    p.add_argument("--modules", type=int, default=len(STDLIB_MODULES),
                   help="use the first N standard-library modules (default: all %(default)s)")
    p.add_argument("--docs-per-module", type=int, default=3, help="documents per module at most (default: %(default)s)")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens per stdlib document (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="generated answers per prompt, 0: none (default: %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens per generated answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of each source's groups held out (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="probe training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024, help="probe minibatch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-2, help="probe peak learning rate (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=64, help="nearest-neighbour candidates, the probe's top N "
                   "(default: %(default)s)")
    p.add_argument("--nn-positions", type=int, default=200, help="held-out positions the nearest-neighbour attack "
                   "tries at each layer (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = report.parse_args(p, draw)
    if args.quick:
        args.layers, args.modules, args.docs_per_module, args.doc_tokens, args.samples = "0,7", 12, 1, 128, 0
        args.candidates, args.nn_positions, args.epochs, args.batch_size = 8, 16, 8, 128
    if not (args.model / "config.json").exists():
        raise SystemExit(f"--model {args.model}: no config.json; prepare the model with `python -m harness.model_prep`")
    return args


def make_text(args, tokenizer) -> tuple[list[Document], dict]:
    """The documents, and where they come from (for the report)."""
    from transformers import AutoModelForCausalLM

    modules = STDLIB_MODULES[: args.modules]
    docs = [d for m in modules for d in stdlib_documents(tokenizer, [m], args.doc_tokens)[: args.docs_per_module]]
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    if args.samples:
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        docs += generated_documents(lm, tokenizer, prompts, samples=args.samples, tokens=args.gen_tokens,
                                    temperature=args.temperature, seed=args.seed)
    return docs, {
        "stdlib": f"docstrings of {len(modules)} Python {platform.python_version()} standard-library modules "
                  f"(module, then public classes and functions by name), cut into documents of {args.doc_tokens} "
                  f"tokens, at most {args.docs_per_module} per module",
        "stdlib_modules": list(modules),
        "generated": (f"{args.model.name}'s answers to the {len(prompts)} prompts of {report.relative(PROMPTS)} "
                      f"({args.samples} per prompt, temperature {args.temperature}, top-p 0.95, seed {args.seed}, "
                      f"{args.gen_tokens} new tokens), prompt and answer as plain text") if args.samples else None,
        "split": f"by group (module / prompt), {args.held_out:.0%} of each source's groups held out"}


def sizes(docs: list[Document]) -> dict:
    return {"documents": len(docs), "groups": len({(d.source, d.group) for d in docs}),
            "tokens": sum(len(d.ids) for d in docs), "tokens_by_source": dict(Counter(d.source for d in docs
                                                                                    for _ in d.ids))}


def run_attacks(args, local, test: list[Document], layers: list[int], x_train, y_train, x_test, y_test,
                nn_flat: list[int], log) -> tuple[list[dict], dict]:
    """Frequency baseline, then the probe at each layer, then the nearest neighbour at each
    layer (deepest first: ``local`` drops layers). Returns the results and per-position rows."""
    common = torch.tensor([t for t, _ in Counter(y_train.tolist()).most_common(5)])
    results = [score("frequency", None, rank_of(common.expand(len(y_test), -1), y_test))]
    rows: dict = {"probe_top1": {}, "nearest_neighbour": {}}
    candidates = {}
    for k in layers:
        t = time.perf_counter()
        probe = train_probe(x_train[k], y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed)
        top = probe.top(x_test[k], 5)
        results.append(score("probe", k, rank_of(top, y_test), classes=len(probe.classes),
                             seconds=time.perf_counter() - t))
        candidates[k] = probe.top(x_test[k][nn_flat], args.candidates)
        rows["probe_top1"][str(k)] = top[:, 0].tolist()
        log(f"probe k={k:<3} top1 {results[-1]['top1']:.3f} top5 {results[-1]['top5']:.3f}")
    where = [(j, i) for j, d in enumerate(test) for i in range(len(d.ids))]
    positions = [where[f] for f in nn_flat]
    for k in sorted(layers, reverse=True):
        t = time.perf_counter()
        local.use_split_layer(k)
        found = nearest_neighbour(local, docs=test, positions=positions, observed=x_test[k][nn_flat],
                                  candidates=None if k == 0 else candidates[k],
                                  rounded=quant.roundtrip(x_test[k][nn_flat], WIRE))
        desc = f"all {local.model.embed_tokens.num_embeddings} tokens" if k == 0 else f"probe top {args.candidates}"
        results.append(nn_entry(k, found, candidates=desc, wire=WIRE, seconds=time.perf_counter() - t))
        rows["nearest_neighbour"][str(k)] = found
        log(f"nearest neighbour k={k:<3} top1 {results[-1]['top1']:.3f} (candidates {desc})")
    rows["nn_positions"] = positions
    return sorted(results, key=lambda r: (r["attack"], -1 if r["layer"] is None else r["layer"])), rows


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from client_lib.local_layers import LocalLayers

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{msg} [{time.perf_counter() - t0:.0f} s]", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    local = LocalLayers(args.model)  # every layer, no final norm: the client's own code
    layers = [int(k) for k in args.layers.split(",")]
    if not all(0 <= k <= local.num_layers for k in layers):
        raise SystemExit(f"--layers {args.layers}: expected values in [0, {local.num_layers}]")
    docs, text = make_text(args, tokenizer)
    seconds = {"text": time.perf_counter() - t0}
    train, test = split_documents(docs, args.held_out, args.seed)
    log(f"{len(train)} training documents ({sizes(train)['tokens']} tokens), {len(test)} held out "
        f"({sizes(test)['tokens']} tokens)")
    x_train, x_test = extract(local, train, layers), extract(local, test, layers)
    y_train = torch.tensor([t for d in train for t in d.ids])
    y_test = torch.tensor([t for d in test for t in d.ids])
    seconds["extract"] = time.perf_counter() - t0 - seconds["text"]
    nn_flat = sorted(random.Random(args.seed).sample(range(len(y_test)), min(args.nn_positions, len(y_test))))
    in_vocab = torch.isin(y_test, y_train)
    results, rows = run_attacks(args, local, test, layers, x_train, y_train, x_test, y_test, nn_flat, log)
    seconds["attacks"] = time.perf_counter() - t0 - sum(seconds.values())
    coverage = float(in_vocab.float().mean())
    data = {"arguments": report.arguments(args), "environment": report.environment(),
            "model": {"name": args.model.name, "num_layers": local.num_layers, "hidden_size": local.hidden_size,
                      "vocab_size": local.model.embed_tokens.num_embeddings},
            "text": {**text, "train": sizes(train), "held_out": sizes(test),
                     "held_out_in_training_vocabulary": coverage,
                     "nn_positions_in_training_vocabulary": float(in_vocab[nn_flat].float().mean())},
            "methods": methods(args), "layers": layers, "results": results, "summary": summary(results, coverage),
            "seconds": {**seconds, "total": time.perf_counter() - t0}}
    held = {id(d) for d in test}
    rows["documents"] = [{"source": d.source, "group": d.group, "held_out": id(d) in held, "ids": d.ids} for d in docs]
    report.write(args.out, data, rows=rows, draw=draw)
    log(f"wrote {args.out}")


def methods(args) -> dict:
    return {
        "frequency": "the 5 most frequent training tokens, the same guess at every position",
        "probe": (f"linear classifier on the standardised layer-k state (per-dimension mean and std of the "
                  f"training states) over every token that occurs in the training text (a held-out token outside "
                  f"them is a miss; no 'other' class, none has a training example); cross-entropy, Adam, one-cycle "
                  f"peak lr {args.lr}, {args.epochs} epochs of minibatches of {args.batch_size}, trained on every "
                  f"training position; scored on every held-out position"),
        "nearest_neighbour": (f"the attacker runs the public model's layers [0, k) (the client's LocalLayers) on the "
                              f"true prefix (oracle prefix) plus each candidate token and guesses the candidate whose "
                              f"state is nearest (L2) to the observed one; candidates: the whole vocabulary at k = 0 "
                              f"(the state is an embedding row), the probe's top {args.candidates} at k > 0; "
                              f"{args.nn_positions} held-out positions drawn with seed {args.seed}, the same at every "
                              f"layer"),
    }


def summary(results: list[dict], coverage: float) -> dict:
    """Top-1 recovery per attack, in layer order, and the probe's ceiling."""
    out = {"held_out_in_training_vocabulary": coverage}
    for r in results:
        if r["layer"] is None:
            out[f"{r['attack']}_top1"] = r["top1"]
        else:
            out.setdefault(f"{r['attack']}_top1_by_layer", {})[str(r["layer"])] = r["top1"]
    return out


def draw(data: dict):
    fig, (ax1, ax2) = report.subplots(1, 2, figsize=(12, 4.5))
    res = data["results"]
    for attack, metric, style in (("probe", "top1", "o-"), ("probe", "top5", "o:"),
                                  ("nearest_neighbour", "top1", "s-")):
        rs = sorted((r for r in res if r["attack"] == attack), key=lambda r: r["layer"])
        ks = [r["layer"] for r in rs]
        err = [[max(0.0, r[metric] - r[f"{metric}_ci95"][0]) for r in rs],
               [max(0.0, r[f"{metric}_ci95"][1] - r[metric]) for r in rs]]  # rounding: no negative lengths
        label = {"probe": "linear probe", "nearest_neighbour": "nearest neighbour (oracle prefix)"}[attack]
        ax1.errorbar(ks, [r[metric] for r in rs], yerr=err, fmt=style, capsize=3, label=f"{label} {metric}")
    freq = next(r for r in res if r["attack"] == "frequency")
    ax1.axhline(freq["top1"], color="grey", linestyle="--", label="frequency baseline top1")
    nn = sorted((r for r in res if r["attack"] == "nearest_neighbour"), key=lambda r: r["layer"])
    key = next(k for k in nn[0] if k.endswith("_wire"))
    wire_name = key.removeprefix("top1_").removesuffix("_wire")
    ax1.plot([r["layer"] for r in nn], [r[key] for r in nn], "x", color="C2", markersize=9,
             label=f"nearest neighbour, {wire_name} wire top1")
    ax1.axhline(data["text"]["held_out_in_training_vocabulary"], color="grey", linestyle=":",
                label="probe ceiling (held-out tokens in training text)")
    train, test = data["text"]["train"], data["text"]["held_out"]
    ax1.set(xlabel="layer whose input state the server sees (k; U shape: m)", ylabel="held-out token recovery",
            ylim=(0, 1.02), title=f"{data['model']['name']}: trained on {train['tokens']} tokens, "
                                  f"{test['tokens']} held out")
    ax1.legend(fontsize=7, loc="lower left")
    for key, label in (("nearest_other_distance_rel_median", "nearest other candidate (median)"),
                       (f"{wire_name}_rounding_rel_median", f"{wire_name} rounding of the observed state (median)"),
                       ("true_distance_rel_max", "true token (max)")):
        pts = [(r["layer"], r[key]) for r in nn if r[key]]
        ax2.plot([k for k, _ in pts], [v for _, v in pts], "s-", label=label)
    ax2.set(xlabel="layer k", ylabel="L2 distance / |observed state|", yscale="log",
            title="nearest neighbour: distance to the observed state")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    main()
