"""Plugin options and the ``vllm-split serve`` command line (the version check: test_version.py)."""
from __future__ import annotations

import json

import pytest

from vllm_split.config import SplitConfig, SplitConfigError
from vllm_split.serve import build_command


# ---------------------------------------------------------------- SplitConfig
@pytest.mark.parametrize("additional_config", [None, {}, {"other_plugin": {"x": 1}}, {"vllm_split": {}}])
def test_defaults(additional_config):
    cfg = SplitConfig.from_additional_config(additional_config)
    assert cfg == SplitConfig()
    assert (cfg.max_frame_bytes, cfg.max_sessions, cfg.max_prompt_tokens) == (8 * 1024 * 1024, 256, 32768)


def test_default_frame_limit_stays_below_uvicorns_websocket_limit():
    assert SplitConfig().max_frame_bytes < 16 * 1024 * 1024


def test_overrides_keep_the_other_defaults():
    cfg = SplitConfig.from_additional_config({"vllm_split": {"max_sessions": 4, "max_frame_bytes": 1024}})
    assert (cfg.max_sessions, cfg.max_frame_bytes, cfg.max_prompt_tokens) == (4, 1024, 32768)


def test_unknown_option_is_named_with_the_known_ones():
    with pytest.raises(SplitConfigError, match=r"vllm_split: unknown option\(s\) \['max_session'\]; known: "
                                               r"\['admission_queue', .*'max_sessions', .*'min_layer', .*\]"):
        SplitConfig.from_additional_config({"vllm_split": {"max_session": 4}})


@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_values_are_rejected(value):
    with pytest.raises(SplitConfigError, match=rf"vllm_split\.max_sessions: expected an integer >= 1, got {value}"):
        SplitConfig.from_additional_config({"vllm_split": {"max_sessions": value}})


@pytest.mark.parametrize("value, shown", [(True, "True"), ("4", "'4'"), (4.0, "4.0"), (None, "None")])
def test_non_integers_are_rejected(value, shown):
    with pytest.raises(SplitConfigError,
                       match=rf"vllm_split\.max_prompt_tokens: expected an integer >= 1, got {shown}"):
        SplitConfig.from_additional_config({"vllm_split": {"max_prompt_tokens": value}})


def test_batch_wait_may_be_zero_but_not_negative():
    assert SplitConfig.from_additional_config({"vllm_split": {"batch_wait_ms": 0}}).batch_wait_ms == 0
    with pytest.raises(SplitConfigError, match=r"vllm_split\.batch_wait_ms: expected an integer >= 0, got -1"):
        SplitConfig.from_additional_config({"vllm_split": {"batch_wait_ms": -1}})


def test_plugin_section_must_be_an_object():
    with pytest.raises(SplitConfigError, match=r"vllm_split: expected an object, got \[4\]"):
        SplitConfig.from_additional_config({"vllm_split": [4]})


# ---------------------------------------------------------------- build_command
@pytest.fixture
def no_plugins_env(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)


def test_serve_gets_the_split_classes_and_keeps_vllms_default_mode(no_plugins_env):
    cmd, env = build_command(["serve", "my/model", "--port", "8001"])
    assert cmd == ["vllm", "serve", "my/model", "--port", "8001",
                   "--scheduler-cls", "vllm_split.engine.scheduler.SplitScheduler",
                   "--worker-cls", "vllm_split.engine.worker.SplitWorker"]  # compiled, like plain vLLM
    assert env == {"VLLM_PLUGINS": "vllm_split"}


@pytest.mark.parametrize("given", [["--scheduler-cls", "my.Sched"], ["--scheduler-cls=my.Sched"]])
def test_user_given_classes_are_kept(no_plugins_env, given):
    cmd, _ = build_command(["serve", "m", *given, "--worker-cls=my.Worker", "--enforce-eager"])
    assert "vllm_split.engine.scheduler.SplitScheduler" not in cmd and "vllm_split.engine.worker.SplitWorker" not in cmd
    assert cmd.count("--enforce-eager") == 1
    assert cmd == ["vllm", "serve", "m", *given, "--worker-cls=my.Worker", "--enforce-eager"]


@pytest.mark.parametrize("argv", [["--split-max-sessions", "4"], ["--split-max-sessions=4"]])
def test_split_options_become_additional_config(no_plugins_env, argv):
    cmd, _ = build_command(["serve", "m", *argv, "--split-max-frame-bytes", "1024"])
    assert not any(a.startswith("--split") for a in cmd)
    i = cmd.index("--additional-config")
    assert json.loads(cmd[i + 1]) == {"vllm_split": {"max_sessions": 4, "max_frame_bytes": 1024}}
    # and the plugin reads exactly what the command passes
    cfg = SplitConfig.from_additional_config(json.loads(cmd[i + 1]))
    assert (cfg.max_sessions, cfg.max_frame_bytes) == (4, 1024)


def test_no_split_options_no_additional_config(no_plugins_env):
    cmd, _ = build_command(["serve", "m"])
    assert "--additional-config" not in cmd


@pytest.mark.parametrize("existing, expected", [
    ("", "vllm_split"),
    ("other", "other,vllm_split"),
    ("a,b", "a,b,vllm_split"),
    ("vllm_split", "vllm_split"),
    ("a,vllm_split,b", "a,vllm_split,b"),
])
def test_vllm_plugins_keeps_existing_plugins_and_adds_ours_once(monkeypatch, existing, expected):
    monkeypatch.setenv("VLLM_PLUGINS", existing)
    _, env = build_command(["serve", "m"])
    assert env == {"VLLM_PLUGINS": expected}


@pytest.mark.parametrize("argv", [[], ["chat", "m"], ["bench", "serve"], ["--split-max-sessions", "4"]])
def test_non_serve_subcommand_exits_with_usage(no_plugins_env, argv):
    with pytest.raises(SystemExit, match=r"usage: vllm-split serve MODEL"):
        build_command(argv)


def test_placement_option_takes_dp_or_greedy():
    assert SplitConfig().placement == "dp"
    assert SplitConfig.from_additional_config({"vllm_split": {"placement": "greedy"}}).placement == "greedy"
    with pytest.raises(SplitConfigError, match=r"vllm_split.placement: expected one of \['dp', 'greedy'\], got 'best'"):
        SplitConfig(placement="best")


def test_split_option_values_are_integers_or_words(no_plugins_env):
    cmd, _ = build_command(["serve", "m", "--split-placement", "greedy", "--split-offload-above-pct=0"])
    i = cmd.index("--additional-config")
    assert json.loads(cmd[i + 1]) == {"vllm_split": {"placement": "greedy", "offload_above_pct": 0}}
    with pytest.raises(SystemExit, match=r"--split-placement needs a value, got '--port'"):
        build_command(["serve", "m", "--split-placement", "--port", "8000"])


def test_gather_window_is_adaptive_by_default_and_can_be_turned_off():
    cfg = SplitConfig()
    assert (cfg.gather, cfg.gather_max_ms, cfg.batch_wait_ms) == ("adaptive", 25, 0)
    assert SplitConfig.from_additional_config({"vllm_split": {"gather": "off"}}).gather == "off"
    with pytest.raises(SplitConfigError, match=r"vllm_split\.gather: expected one of \['adaptive', 'off'\], got 'on'"):
        SplitConfig.from_additional_config({"vllm_split": {"gather": "on"}})


def test_whole_graph_steps_are_on_by_default_and_can_be_turned_off(no_plugins_env):
    assert SplitConfig().whole_graph == "on"
    assert SplitConfig.from_additional_config({"vllm_split": {"whole_graph": "off"}}).whole_graph == "off"
    with pytest.raises(SplitConfigError, match=r"vllm_split\.whole_graph: expected one of \['on', 'off'\], got 'yes'"):
        SplitConfig(whole_graph="yes")
    cmd, _ = build_command(["serve", "m", "--split-whole-graph", "off"])
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"vllm_split": {"whole_graph": "off"}}
    assert "--enable-prompt-embeds" not in cmd  # the worker turns the embeddings input on, never the API server


@pytest.mark.parametrize("value, shown", [(0, "0"), (-5, "-5"), (2.5, "2.5"), ("25", "'25'")])
def test_gather_max_ms_is_a_positive_integer(value, shown):
    with pytest.raises(SplitConfigError, match=rf"vllm_split\.gather_max_ms: expected an integer >= 1, got {shown}"):
        SplitConfig.from_additional_config({"vllm_split": {"gather_max_ms": value}})


def test_gather_options_on_the_command_line(no_plugins_env):
    cmd, _ = build_command(["serve", "m", "--split-gather", "off", "--split-gather-max-ms=10"])
    i = cmd.index("--additional-config")
    assert json.loads(cmd[i + 1]) == {"vllm_split": {"gather": "off", "gather_max_ms": 10}}
    cfg = SplitConfig.from_additional_config(json.loads(cmd[i + 1]))
    assert (cfg.gather, cfg.gather_max_ms) == ("off", 10)


def test_the_privacy_floor_is_a_serve_option_checked_against_the_models_depth(no_plugins_env):
    assert SplitConfig().privacy_floor == 0
    cmd, _ = build_command(["serve", "m", "--split-privacy-floor", "12"])
    i = cmd.index("--additional-config")
    cfg = SplitConfig.from_additional_config(json.loads(cmd[i + 1]))
    assert cfg.privacy_floor == 12 and cfg.min_layer == 0  # policy only: the server still holds every layer
    cfg.check_model(num_layers=12)
    with pytest.raises(SplitConfigError, match=r"vllm_split\.privacy_floor: expected at most the model's 11 decoder "
                                               r"layers, got 12"):
        cfg.check_model(num_layers=11)
    with pytest.raises(SplitConfigError, match=r"vllm_split\.privacy_floor: expected an integer >= 0, got -1"):
        SplitConfig(privacy_floor=-1)


def test_split_drafts_adds_the_client_drafts_spec_config(no_plugins_env):
    assert SplitConfig().drafts == 0
    cmd, _ = build_command(["serve", "m", "--split-drafts", "4"])
    i = cmd.index("--speculative-config")
    assert json.loads(cmd[i + 1]) == {"method": "custom_class", "model": "vllm_split.engine.drafts.ClientDrafts",
                                      "num_speculative_tokens": 4}
    j = cmd.index("--additional-config")
    assert SplitConfig.from_additional_config(json.loads(cmd[j + 1])).drafts == 4
    cmd, _ = build_command(["serve", "m", "--split-drafts=0"])  # 0: off, no spec config (min_p etc. stay allowed)
    assert "--speculative-config" not in cmd
    assert "--speculative-config" not in build_command(["serve", "m"])[0]


@pytest.mark.parametrize("argv, message", [
    (["--split-drafts", "17"], r"--split-drafts: vllm_split\.drafts: expected an integer from 0 to 16, got 17"),
    (["--split-drafts", "many"], r"--split-drafts: vllm_split\.drafts: expected an integer >= 0, got 'many'"),
    (["--split-drafts", "2", "--speculative-config", "{}"], r"--split-drafts sets --speculative-config itself"),
])
def test_split_drafts_refusals(no_plugins_env, argv, message):
    with pytest.raises(SystemExit, match=message):
        build_command(["serve", "m", *argv])
    with pytest.raises(SplitConfigError, match=r"vllm_split\.drafts: expected an integer from 0 to 16, got 17"):
        SplitConfig(drafts=17)
