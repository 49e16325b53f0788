"""Start and stop a real vLLM API server subprocess (tests, demo, benchmarks; one at a time)."""
from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 420
REPO_ROOT = Path(__file__).resolve().parents[1]

# Servers run in their own process group (so that stop() reaches the engine processes), so
# they outlive a benchmark killed with SIGTERM unless it stops them: at exit every live one
# is stopped, and SIGTERM (default action: die without cleaning up) exits through that.
_LIVE: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()


def _stop_live_servers() -> None:
    for server in list(_LIVE):
        server.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_servers_on_exit() -> None:
    if getattr(_stop_servers_on_exit, "done", False):
        return
    _stop_servers_on_exit.done = True  # type: ignore[attr-defined]
    atexit.register(_stop_live_servers)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def kv_capacity_tokens(server_log: Path) -> int | None:
    """The engine's KV cache capacity in tokens, read from its start-up log."""
    m = re.search(r"KV cache size: ([\d,]+) tokens", Path(server_log).read_text(errors="replace"))
    return int(m.group(1).replace(",", "")) if m else None


@dataclass(frozen=True)
class TLSFiles:
    """A server's certificate and key (vLLM's ``--ssl-certfile``/``--ssl-keyfile``) and the CA
    file its clients trust (the certificate itself when it is self-signed)."""

    certfile: Path
    keyfile: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies the server against ``ca_file``."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def _scrape(url: str, ssl_context: ssl.SSLContext | None = None) -> list[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=30, context=ssl_context) as r:
        return r.read().decode().splitlines()


def split_metrics(url: str, ssl_context: ssl.SSLContext | None = None) -> dict[str, float]:
    """vllm-split's own metrics at ``url`` (:func:`parse_split_metrics`); ``ssl_context``: an
    https:// server's (``VLLMServer.ssl_context``)."""
    return parse_split_metrics(_scrape(url, ssl_context))


def parse_split_metrics(lines: Iterable[str]) -> dict[str, float]:
    """vllm-split's own metrics in a ``/metrics`` text's lines, by name with labels
    (``name{label="v"}``, the labels as exported). A series with an ``engine`` label is there
    as exported and, summed over the engines, without that label (``vllm_split:sessions_open``
    is the replica's, ``vllm_split:sessions_open{engine="1"}`` one engine's)."""
    out: dict[str, float] = {}
    for line in lines:
        m = re.match(r"^(vllm_split:[a-z_]+)(?:\{([^}]*)\})?\s+([-+0-9.eE]+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[f"{name}{{{labels}}}" if labels else name] = value
        others = ",".join(p for p in re.findall(r'\w+="[^"]*"', labels) if not p.startswith("engine="))
        if others != labels:
            key = f"{name}{{{others}}}" if others else name
            out[key] = out.get(key, 0.0) + value
    return out


def by_engine(m: dict[str, float], name: str) -> dict[str, float]:
    """One metric of :func:`split_metrics` per engine label: ``{"0": v0, "1": v1}``."""
    out = {}
    for key, value in m.items():
        hit = re.fullmatch(re.escape(name) + r'\{(?:[^}]*,)?engine="(\d+)"(?:,[^}]*)?\}', key)
        if hit:
            out[hit.group(1)] = out.get(hit.group(1), 0.0) + value
    return out


def metrics(url: str, ssl_context: ssl.SSLContext | None = None) -> dict[str, float]:
    """vLLM's Prometheus gauges/counters at ``url`` (unlabelled sums by metric name)."""
    out: dict[str, float] = {}
    for line in _scrape(url, ssl_context):
        m = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        m = re.search(r'^vllm:cache_config_info\{.*num_gpu_blocks="(\d+)"', line)
        if m:
            out["num_gpu_blocks"] = float(m.group(1))
    return out


def vllm_by_engine(url: str, name: str, ssl_context: ssl.SSLContext | None = None) -> dict[str, float]:
    """vLLM's metric ``name`` (e.g. ``vllm:num_requests_running``) per ``engine`` label (its DP rank)."""
    series = {}
    for line in _scrape(url, ssl_context):  # every series by its exported name with labels
        m = re.match(r"^([a-zA-Z_:][\w:]*\{[^}]*\})\s+([-+0-9.eE]+)$", line)
        if m:
            series[m.group(1)] = float(m.group(2))
    return by_engine(series, name)


def kv_blocks_in_use(m: dict[str, float]) -> int:
    """KV blocks held by requests, from :func:`metrics` (usage fraction x pool size)."""
    return round(m.get("vllm:kv_cache_usage_perc", 0.0) * m.get("num_gpu_blocks", 0.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float, name: str, log_tail, poll_s: float = 1.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
    """Wait until ``url``/health answers 200; raise (with ``log_tail()``) if ``proc`` exits first or time runs out,
    or at once if an https:// ``url``'s certificate does not verify against ``ssl_context``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2, context=ssl_context) as r:
                if r.status == 200:
                    return
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise RuntimeError(f"{name} at {url}: {exc.reason}") from exc
        except OSError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{name} not ready after {timeout}s:\n{log_tail()}")


class VLLMServer:
    """A vLLM API server subprocess: ``split=True`` runs ``vllm-split serve``; with ``tls`` it
    serves https:// and wss:// (vLLM's ``--ssl-certfile``/``--ssl-keyfile``), ``url`` is
    https:// and ``ssl_context`` verifies it (else None)."""

    def __init__(self, model: str | Path, *, split: bool, log_path: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, port: int | None = None, eager: bool | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.port = port or free_port()  # a given port: restart a server where its clients expect it
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.ssl_context = tls.client_context() if tls else None
        self.log_path = log_path
        launcher = [] if split else ["plain"]
        tls_args = ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)] if tls else []
        cmd = [sys.executable, "-m", "vllm_split.serve", *launcher, "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048",
               "--max-num-seqs", "16", *tls_args, *extra_args]
        # eager=None: each server's default: a plain reference runs eager (the kernels of the
        # eager split path: exact references), a split server runs vLLM's default compiled
        # mode (its split steps take the compiled layer bodies); True/False force the mode
        if eager is None:
            eager = not split
        cmd.append("--enforce-eager" if eager else "--no-enforce-eager")
        # VLLM_USE_AOT_COMPILE=0: vLLM 0.32's AOT cache of the compiled model fails to load on the
        # CPU build ("'function' object has no attribute 'finalize_loading'"), so every start
        # recompiled (~60 s); without AOT, torch.compile's own caches make a restart ~35 s shorter.
        # The compiled code is the same. Plain and split servers alike.
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "VLLM_USE_AOT_COMPILE": os.environ.get("VLLM_USE_AOT_COMPILE", "0"), **(env or {})}
        if not split:
            full_env.pop("VLLM_PLUGINS", None)
        # the engine may load classes from harness/ (``--worker-cls harness.timing_worker.TimingWorker``)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        _stop_servers_on_exit()
        _LIVE.add(self)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        wait_healthy(self.url, self.proc, timeout=timeout, name="vLLM server", log_tail=self.log_tail,
                     ssl_context=self.ssl_context)

    def __enter__(self) -> "VLLMServer":
        """``with VLLMServer(...) as server``: ready on entry, stopped on exit (also on failure)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_exit(self, timeout: float = STARTUP_TIMEOUT_S) -> int:
        """For servers expected to fail at start-up: their exit code."""
        return self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        _LIVE.discard(self)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the engine processes it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
