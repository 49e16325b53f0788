"""Plugin options, read from vLLM's ``--additional-config '{"vllm_split": {...}}'``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm_split.wire.drafts import MAX_DRAFTS
from vllm_split.wire.protocol import WIRE_DTYPES

CONFIG_KEY = "vllm_split"
STRING_OPTIONS = {"placement": ("dp", "greedy"), "gather": ("adaptive", "off"), "gather_weigh": ("on", "off"),
                  "composition": ("gathered", "mixed", "grouped", "auto"), "whole_graph": ("on", "off")}
LIST_OPTIONS = {"wire_dtypes": WIRE_DTYPES}  # comma-separated names, each one of these


class SplitConfigError(ValueError):
    """A bad plugin option (message names it and what was expected)."""


@dataclass(frozen=True, slots=True)
class SplitConfig:
    # Largest WebSocket frame accepted from a client (bytes). Keep it below the HTTP
    # server's own WebSocket limit (uvicorn: 16 MiB), which drops the connection instead.
    max_frame_bytes: int = 8 * 1024 * 1024
    # Largest number of split sessions open at once on this replica (several API servers,
    # --api-server-count: each takes an exact share).
    max_sessions: int = 256
    # Largest prompt (tokens) a split session may send.
    max_prompt_tokens: int = 32768
    # Gather window (ms): when some split requests of the running batch are ready and others
    # still wait for their client's activation, wait up to this long so that they run in
    # one step (larger batches, fewer steps) instead of one step per arrival. 0: off.
    # A fixed window (> 0) replaces the adaptive one (``gather``).
    batch_wait_ms: int = 0
    # Adaptive gather window (vllm_split/engine/gather.py): hold a step for the split
    # requests whose activation is expected within min(gather_max_ms, half the recent step
    # time), from each client's measured turnaround; never for a late client or one without
    # an estimate. "off": run each step as soon as any request is ready.
    gather: str = "adaptive"
    # The longest the adaptive window holds a step (ms): covers loopback and LAN clients at
    # small split layers (a few ms); a client slower than this is not waited for.
    gather_max_ms: int = 25
    # Weigh a hold against the ordinary rows it delays (vllm_split/engine/gather.py): with
    # W requests waited for and R ordinary requests ready, hold w only while W (S - w) > R w
    # (S the recent step time). "off": the bound above alone.
    gather_weigh: str = "on"
    # Lowest split layer this server accepts. The server then loads no weights and keeps no
    # KV cache for layers [0, min_layer) (more room for requests) and serves split sessions
    # only: ordinary requests are refused. 0: off.
    min_layer: int = 0
    # Largest max_tokens a split session may ask for (a larger request is refused at Open).
    max_tokens_per_session: int = 4096
    # Seconds the server waits for a frame it needs from the client (the prompt, or the
    # activation for the token it just sent); then the session is aborted, its KV freed. 0: off.
    idle_timeout_s: int = 60
    # Seconds a session may last, from connection to its last token; then it is aborted. 0: off.
    session_lifetime_s: int = 3600
    # Admission controller (docs/admission.md): sessions that may wait for admission at once
    # (0: refuse at once when busy; shared out like max_sessions), how long one may wait, the SLA assumed for a client that
    # states none, and whether to warm the live cost model up at start-up (1) or not (0).
    admission_queue: int = 64
    admission_wait_ms: int = 5000
    default_ttft_ms: int = 5000
    default_tpot_ms: int = 250
    warmup: int = 1
    # Engine utilisation (percent of the last 2 s spent running the model) above which the
    # controller minimises server work (the DP); below it the server has compute to spare and
    # offloads as little as the SLA allows. 0: the DP at any load.
    offload_above_pct: int = 50
    # Step composition by split layer (vllm_split/engine/composition.py): "gathered" (each
    # step runs what is ready, the adaptive gather window holds it for activations expected
    # soon), "mixed" (no holds), "grouped" (steps alternate between the requests at or above
    # a split layer, skipping the layers below it, and the others; the threshold the
    # roofline model finds best) or "auto" (per batch, the one the model predicts serves the
    # most tokens per engine-second within every session's TPOT bound).
    composition: str = "gathered"
    # Placement algorithm under load: "dp" (the planner's DP) or "greedy" (the baseline rule
    # of vllm_split/planner/baselines.py, for comparisons).
    placement: str = "dp"
    # A session placed at k = 0 whose client offers it (Open.server_decode) runs in the engine
    # as an ordinary request: the client sends the prompt's token ids and gets tokens, with
    # no activation and no round trip per token (at k = 0 the client's only work would be
    # the embedding lookup). 1: on, 0: every session sends activations.
    server_decode: int = 1
    # An offload must save at least this share (%) of a request's server work, else a client
    # that offers server decoding is decoded on the server (no round trip per token, no risk
    # to its TPOT): where every step runs every layer anyway an offload saves only rows.
    min_offload_saving_pct: int = 10
    # Wire dtypes this server takes activations in (comma-separated): a client offers the
    # ones it can send (Open.wire_dtypes) and gets the first of its offer listed here. A
    # client that offers none sends float32, float16 or bfloat16 as before.
    wire_dtypes: str = "int8_mixed,int8_row,fp8_e4m3,float16,bfloat16,float32"
    # Privacy floor: the lowest split layer a session may be placed at (the hidden state at a
    # shallow layer can be inverted back to the tokens; at 0 it is the token embedding). The
    # server then takes no activation shallower than it and decodes no session itself (a
    # client's Open.privacy_floor may raise it per session). Unlike min_layer it is policy
    # only: the server holds every layer and serves ordinary requests. At most the model's
    # number of decoder layers (checked at start-up). 0: off.
    privacy_floor: int = 0
    # KV per layer range (docs/kv_ranges.md): cut the decoder layers into this many contiguous
    # ranges, each a vLLM KV cache group with its own block table over one block pool; a split
    # request at split_layer k holds no KV blocks in the ranges wholly below k (ordinary
    # requests hold all). 1: off (one group, vLLM's own layout).
    kv_ranges: int = 1
    # Client-drafted speculative decoding (docs/design/issue14_drafts.md): the most draft
    # tokens a split session may send with each decode activation (verified in one engine
    # step by vLLM's rejection sampler); needs vLLM's spec config with the no-op
    # ``vllm_split.engine.drafts.ClientDrafts`` proposer and at least this many speculative
    # tokens (``vllm-split serve --split-drafts K`` adds it). 0: off, no spec config.
    drafts: int = 0
    # A step whose rows all enter at layer 0 (ordinary requests and split sessions at k = 0)
    # runs vLLM's own compiled model, the split rows as its input embeddings (the worker turns
    # on the model runner's embeddings input, vLLM's ``enable_prompt_embeds``, in the worker
    # only: the API server still refuses prompt embeddings). "off": such steps run the split
    # layer bodies like any other split step. Only in vLLM's compiled mode, on single-worker
    # engines (not yet validated under tensor or pipeline parallelism).
    whole_graph: str = "on"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in LIST_OPTIONS:
                names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [value]
                bad = [n for n in names if n not in LIST_OPTIONS[f.name]]
                if bad:
                    raise SplitConfigError(f"{CONFIG_KEY}.{f.name}: expected comma-separated names from "
                                           f"{list(LIST_OPTIONS[f.name])}, got {value!r} ({bad[0]!r} is not one)")
                object.__setattr__(self, f.name, ",".join(names))
                continue
            if f.name in STRING_OPTIONS:
                if value not in STRING_OPTIONS[f.name]:
                    raise SplitConfigError(f"{CONFIG_KEY}.{f.name}: expected one of {list(STRING_OPTIONS[f.name])}, got {value!r}")
                continue
            low = 0 if f.name in ("batch_wait_ms", "min_layer", "idle_timeout_s", "session_lifetime_s",
                                  "admission_queue", "admission_wait_ms", "warmup", "offload_above_pct",
                                  "server_decode", "min_offload_saving_pct", "privacy_floor", "drafts") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SplitConfigError(f"{CONFIG_KEY}.{f.name}: expected an integer >= {low}, got {value!r}")
        if self.drafts > MAX_DRAFTS:
            raise SplitConfigError(f"{CONFIG_KEY}.drafts: expected an integer from 0 to {MAX_DRAFTS}, got {self.drafts}")

    def check_model(self, *, num_layers: int) -> None:
        """Start-up: the options bounded by the served model's depth (``num_layers`` decoder layers)."""
        if self.privacy_floor > num_layers:
            raise SplitConfigError(f"{CONFIG_KEY}.privacy_floor: expected at most the model's {num_layers} decoder "
                                   f"layers, got {self.privacy_floor}")

    @property
    def accepted_wire_dtypes(self) -> tuple[str, ...]:
        """The wire dtypes of the ``wire_dtypes`` option, in its order."""
        return tuple(self.wire_dtypes.split(","))

    @property
    def gather_mode(self) -> str:
        """Which gather window the scheduler runs: "fixed" (``batch_wait_ms`` > 0 replaces the
        adaptive one), "adaptive" or "off" (also with the "mixed" or "grouped" composition,
        which never hold a step)."""
        if self.composition in ("mixed", "grouped"):
            return "off"
        return "fixed" if self.batch_wait_ms > 0 else self.gather

    @property
    def gather_max_s(self) -> float:
        """The longest that window holds a step for an activation (0 when off)."""
        mode = self.gather_mode
        return self.batch_wait_ms / 1000 if mode == "fixed" else self.gather_max_ms / 1000 if mode == "adaptive" else 0.0

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "SplitConfig":
        raw = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        if not isinstance(raw, dict):
            raise SplitConfigError(f"{CONFIG_KEY}: expected an object, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SplitConfigError(f"{CONFIG_KEY}: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)
