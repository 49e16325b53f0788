"""Client-drafted speculative decoding: the engine side's carrier (docs/design/issue14_drafts.md).

A split session granted drafts sends, with each decode activation, the rows of up to K
draft tokens and their ids; the split scheduler puts those ids in the request's
``spec_token_ids`` at the top of ``schedule()`` and vLLM's own speculative-decoding path
does the rest (schedules 1 + d tokens, builds the spec-decode metadata, runs the rejection
sampler, rolls ``num_computed_tokens`` back). For that path to exist the server needs a
speculative config, and vLLM a proposer: :class:`ClientDrafts`, which proposes nothing
(ordinary requests get no drafts; split requests get their client's).

``vllm-split serve --split-drafts K`` adds ``--speculative-config`` with
:data:`CLASS_PATH` and ``num_speculative_tokens: K`` (:func:`speculative_config`) and the
plugin option ``drafts: K``; :func:`server_drafts` checks the two agree at start-up.
Imports without vLLM (the runner only imports the class by its dotted path).
"""
from __future__ import annotations

import json
from typing import Any

from vllm_split.config import CONFIG_KEY, SplitConfig, SplitConfigError

CLASS_PATH = "vllm_split.engine.drafts.ClientDrafts"


def speculative_config(num_drafts: int) -> str:
    """The ``--speculative-config`` value for a server verifying up to ``num_drafts`` client drafts."""
    return json.dumps({"method": "custom_class", "model": CLASS_PATH, "num_speculative_tokens": num_drafts})


def server_drafts(config: SplitConfig, spec_config: Any) -> int:
    """K, the drafts per split request per step this server verifies (0: none): the ``drafts``
    option, which needs vLLM's speculative config (``spec_config``; None: none) to run
    :class:`ClientDrafts` with at least that many speculative tokens."""
    if config.drafts == 0:
        return 0
    method = getattr(spec_config, "method", None)
    model = getattr(spec_config, "model", None)
    if spec_config is None or method != "custom_class" or model != CLASS_PATH:
        found = "none" if spec_config is None else f"method {method!r}, model {model!r}"
        raise SplitConfigError(f"{CONFIG_KEY}.drafts {config.drafts} needs vLLM's --speculative-config with the "
                               f"{CLASS_PATH} proposer (start with `vllm-split serve --split-drafts K`); found {found}")
    if spec_config.num_speculative_tokens < config.drafts:
        raise SplitConfigError(f"{CONFIG_KEY}.drafts {config.drafts} exceeds the speculative config's "
                               f"num_speculative_tokens {spec_config.num_speculative_tokens}")
    return config.drafts


class ClientDrafts:
    """vLLM ``custom_class`` proposer that proposes nothing: the drafts come from the clients.

    The contract (vllm/v1/spec_decode/custom_class_proposer.py): built as ``cls(vllm_config)``,
    with a callable ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, ...)``
    returning one draft list per request. The CPU runner also calls ``load_model(model)``
    without checking that it exists (cpu_model_runner.py), hence the no-op.
    """

    def __init__(self, vllm_config: Any = None, *args: Any, **kwargs: Any) -> None:
        spec = getattr(vllm_config, "speculative_config", None)
        self.num_speculative_tokens = getattr(spec, "num_speculative_tokens", 0)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list, *args: Any, **kwargs: Any) -> list[list[int]]:
        """No drafts for any request of the batch (split requests get theirs in ``schedule()``)."""
        return [[] for _ in sampled_token_ids]
