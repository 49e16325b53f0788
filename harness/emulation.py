"""Emulated clients for tests and benchmarks: a client's compute and network from a
profile, with real waits, over a real session to the real server.

On a 2-core machine real clients would compete with the server being measured. An
emulated client replays hidden states computed beforehand, exactly, by the client library
(:func:`all_layer_states`: the input of every layer for the whole sequence; greedy decoding
makes the sequence known), and sleeps what its device would take (``ClientProfile`` times
per layer). :class:`EmulatedLink` delays each message by ``rtt/2 + 8 * bytes / bandwidth``
in its direction. What is emulated: the client's compute time and the network's delay and
bandwidth. What is real: the server, the sessions, the bytes sent, the tokens returned.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from vllm_split.control.request_graph import ClientCosts
from vllm_split.wire import protocol as wire


@dataclass(frozen=True, slots=True)
class EmulatedLink:
    rtt_s: float
    uplink_bps: float
    downlink_bps: float

    async def uplink(self, num_bytes: int) -> None:
        await asyncio.sleep(self.rtt_s / 2 + 8.0 * num_bytes / self.uplink_bps)

    async def downlink(self, num_bytes: int) -> None:
        await asyncio.sleep(self.rtt_s / 2 + 8.0 * num_bytes / self.downlink_bps)


@torch.inference_mode()
def all_layer_states(layers, token_ids: list[int]) -> torch.Tensor:
    """``[N + 1, len(token_ids), hidden]``: the input of every layer (index N: the last
    layer's output, before the final norm), from a client library loaded with every layer."""
    if layers.split_layer != layers.num_layers:
        raise ValueError("all_layer_states needs LocalLayers(..., split_layer='auto') (every layer loaded)")
    ids = torch.tensor([token_ids], dtype=torch.long, device=layers.device)
    out = layers.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack([h[0] for h in out]).to("cpu")


class ReplayLayers:
    """Stands in for :class:`client_lib.LocalLayers` in a session: returns the stored rows at
    its split layer and waits the time ``profile`` gives for computing them. Like the real
    client it holds at most ``profile.max_layers`` layers: a split layer above that (fixed
    here, or chosen by a server that ignored the bound) raises ValueError."""

    def __init__(self, states: torch.Tensor, token_ids: list[int], *, profile: wire.ClientProfile,
                 fingerprint: str, split_layer: int | str = "auto") -> None:
        self.states = states
        self.token_ids = list(token_ids)
        self.profile = profile
        self.fingerprint = fingerprint
        self.num_layers = states.shape[0] - 1
        self.max_layers = profile.max_layers  # None: no bound
        self.auto = split_layer == "auto"
        if self.auto:  # it "loads" the layers it can hold
            self.split_layer = self.num_layers if self.max_layers is None else min(self.num_layers, self.max_layers)
        else:
            self.split_layer = self._within_bound(int(split_layer), "fixed")
        self.num_positions = 0
        self.mismatch: str | None = None

    def _within_bound(self, split_layer: int, how: str) -> int:
        if self.max_layers is not None and split_layer > self.max_layers:
            raise ValueError(f"split layer {split_layer} ({how}) is above this client's memory bound: it holds at "
                             f"most {self.max_layers} decoder layers (profile.max_layers)")
        return split_layer

    def use_split_layer(self, split_layer: int) -> None:
        self.split_layer = self._within_bound(split_layer, "chosen by the server")
        self.reset()

    def reset(self) -> None:
        self.num_positions = 0

    def truncate(self, num_positions: int) -> None:
        """Forget the positions from ``num_positions`` on (rejected drafts), like ``LocalLayers``."""
        if not 0 <= num_positions <= self.num_positions:
            raise ValueError(f"truncate: expected 0 <= num_positions <= {self.num_positions}, got {num_positions}")
        self.num_positions = num_positions

    async def aforward(self, token_ids: list[int]) -> torch.Tensor:
        """The script's rows for the next positions. A decode call with several tokens is the last
        token and drafts: only the first must match the script. A draft's row is the script's row
        at its position whether or not the draft is right: a wrong draft's row only reaches
        positions after the first rejection, which the server discards (zeros past the script)."""
        start, n = self.num_positions, len(token_ids)
        checked = n if start == 0 or n == 1 else 1
        expected = self.token_ids[start : start + checked]
        if list(token_ids[:checked]) != expected and self.mismatch is None:
            self.mismatch = f"position {start}: got tokens {list(token_ids[:checked])}, the script has {expected}"
        if self.split_layer:  # a client holding no layer (max_layers=0) states no layer times
            # the planner's client-pass model (ClientCosts.pass_s): a decode step, or the last
            # token and drafts in one pass, at least a decode step; the prompt at the prefill rate
            costs = ClientCosts(prefill_s_per_token=self.profile.layer_prefill_s_per_token,
                                decode_s=self.profile.layer_decode_s)
            per_layer = costs.prefill_s_per_token * n if start == 0 else costs.pass_s(n)
            await asyncio.sleep(per_layer * self.split_layer)
        self.num_positions += n
        rows = self.states[self.split_layer, start : start + n]
        if rows.shape[0] < n:
            rows = torch.cat([rows, rows.new_zeros(n - rows.shape[0], rows.shape[1])])
        return rows


@dataclass
class Script:
    """What emulated clients replay: the prompt, its greedy continuation, every layer's input."""

    prompt_ids: list[int]
    expected: list[int]
    states: torch.Tensor  # [N + 1, len(prompt_ids) + len(expected), hidden]
    fingerprint: str

    def layers(self, profile: wire.ClientProfile, split_layer: int | str = "auto") -> ReplayLayers:
        return ReplayLayers(self.states, self.prompt_ids + self.expected, profile=profile,
                            fingerprint=self.fingerprint, split_layer=split_layer)


async def make_script(url: str, model_dir, prompt_ids: list[int], num_tokens: int, *, split_layer: int = 7) -> Script:
    """Greedy continuation from the server (a real session at ``split_layer``, token-exact
    to the plain engine), then every layer's input for the whole sequence."""
    from client_lib.local_layers import LocalLayers
    from client_lib.session import SplitSession

    expected = []
    async with await SplitSession.create(url, LocalLayers(model_dir, split_layer=split_layer),
                                         sampling=wire.SamplingOptions(max_tokens=num_tokens, ignore_eos=True)) as s:
        async for event in s.generate(prompt_ids):
            expected.append(event.token_id)
    full = LocalLayers(model_dir, split_layer="auto")
    return Script(list(prompt_ids), expected, all_layer_states(full, list(prompt_ids) + expected), full.fingerprint)


async def run_emulated(url: str, script: Script, *, profile: wire.ClientProfile, link: EmulatedLink | None,
                       sla: wire.RequestSLA | None, max_tokens: int, split_layer: int | str = "auto",
                       server_decode: bool = True, draft="none", num_drafts: int = 4, request_type: str = ""):
    """One emulated client's whole session: (session with its Opened and stats, tokens, layers).
    ``server_decode``: the client offers server decoding at ``k = 0`` (the library's default);
    ``draft``, ``num_drafts``, ``request_type``: ``SplitSession.create``'s (drafts, issue 14)."""
    from client_lib.session import SplitSession

    layers = script.layers(profile, split_layer)
    tokens = []
    async with await SplitSession.create(url, layers, sampling=wire.SamplingOptions(max_tokens=max_tokens, ignore_eos=True),
                                         sla=sla, profile=profile, link=link, server_decode=server_decode,
                                         draft=draft, num_drafts=num_drafts, request_type=request_type) as session:
        async for event in session.generate(script.prompt_ids):
            tokens.append(event.token_id)
    return session, tokens, layers
