"""``vllm-split serve MODEL [vLLM serve options]``: vLLM's ``serve`` with the plugin on.

It is exactly ``vllm serve`` plus what enabling vllm-split means:

* ``VLLM_PLUGINS`` gains ``vllm_split`` (vLLM loads endpoint plugins only when named there),
* ``--scheduler-cls vllm_split.engine.scheduler.SplitScheduler`` and
  ``--worker-cls vllm_split.engine.worker.SplitWorker`` (unless given),
* ``--split-*`` options become ``--additional-config '{"vllm_split": {...}}'``;
  ``--split-drafts K`` (client-drafted speculative decoding, 0..16) also adds
  ``--speculative-config`` with the plugin's no-op proposer and K speculative tokens.

It also works on the CPU build, whose own ``vllm`` console script is broken
(``patches/cli_version.py``). ``--print-command`` shows the equivalent stock command.
``vllm-split plain serve ...`` runs stock vLLM without the plugin (for A/B comparisons on
the CPU build).
"""
from __future__ import annotations

import json
import os
import shlex
import sys

from vllm_split.config import CONFIG_KEY, SplitConfig, SplitConfigError
from vllm_split.engine.drafts import speculative_config

SPLIT_FLAGS = {
    "--scheduler-cls": "vllm_split.engine.scheduler.SplitScheduler",
    "--worker-cls": "vllm_split.engine.worker.SplitWorker",
}


def build_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(vllm CLI argv, environment additions) for ``vllm-split serve ...``."""
    args: list[str] = []
    options: dict[str, int | str] = {}
    it = iter(argv)
    for arg in it:
        if arg.startswith("--split-"):
            name, eq, value = arg[len("--split-"):].partition("=")
            if not eq:
                value = next(it, None)
            if value is None or value.startswith("--") or not value:
                raise SystemExit(f"vllm-split: {arg.partition('=')[0]} needs a value, got {value!r}")
            options[name.replace("-", "_")] = int(value) if value.isdigit() else value
        else:
            args.append(arg)
    if not args or args[0] != "serve":
        raise SystemExit("usage: vllm-split serve MODEL [vllm serve options] [--split-OPTION VALUE ...]")
    for flag, value in SPLIT_FLAGS.items():
        if not any(a == flag or a.startswith(flag + "=") for a in args):
            args += [flag, value]
    drafts = options.get("drafts", 0)
    if drafts:
        if any(a == "--speculative-config" or a.startswith("--speculative-config=") for a in args):
            raise SystemExit("vllm-split: --split-drafts sets --speculative-config itself: give one of them")
        try:
            SplitConfig(drafts=drafts)
        except SplitConfigError as exc:
            raise SystemExit(f"vllm-split: --split-drafts: {exc}") from None
        args += ["--speculative-config", speculative_config(drafts)]
    if options:
        args += ["--additional-config", json.dumps({CONFIG_KEY: options})]
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    if "vllm_split" not in plugins:
        plugins.append("vllm_split")
    return ["vllm", *args], {"VLLM_PLUGINS": ",".join(plugins)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    print_only = "--print-command" in argv
    if print_only:
        argv.remove("--print-command")
    if argv[:1] == ["plain"]:
        cmd, env = ["vllm", *argv[1:]], {}
    else:
        cmd, env = build_command(argv)
    if print_only:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return
    os.environ.update(env)
    from vllm_split.patches import cli_version

    cli_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = cmd
    vllm_main()


if __name__ == "__main__":
    main()
