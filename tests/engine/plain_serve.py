"""Plain ``vllm serve`` (no plugin) for the reference server; works on the CPU build."""
import sys

from vllm_split.patches import cli_version

if __name__ == "__main__":
    cli_version.apply()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
