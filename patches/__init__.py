"""Changes to vLLM internals that no extension point or subclass can make.

Installed as the package ``vllm_split.patches``. Each module documents Target, Process,
Why, Why not subclass, Upstream, Remove when and Pinned version, and is applied only on
the code paths that enable the plugin. ``tests/unit/patches/test_patch_contracts.py`` records the
patched targets' signatures so that an upgrade that moves them fails a test.
"""
