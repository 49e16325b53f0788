"""Transport: the split-session WebSocket route on vLLM's API server.

Registered through vLLM's ``vllm.endpoint_plugins`` entry point (loaded only when
``VLLM_PLUGINS`` names ``vllm_split``). The route accepts the WebSocket, turns its
messages into bytes for :func:`vllm_split.api.session_driver.run_session` (which sends
every ``Error`` of a session), maps failures to close codes, and always releases the
session. No tensor math here.
"""
from __future__ import annotations

import asyncio
import dataclasses
from argparse import Namespace
from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState
from vllm.logger import init_logger

from vllm_split.wire import contract
from vllm_split.wire.contract import ErrorCode
from vllm_split.wire import protocol as wire
from vllm_split.api.admission import AdmissionController, QueueLimits
from vllm_split.api.engines import EngineSet, share
from vllm_split.control.policy import AdmissionPolicy
from vllm_split.config import SplitConfig
from vllm_split.engine.drafts import server_drafts
from vllm_split.wire.fingerprint import model_fingerprint
from vllm_split.planner import SLA
from vllm_split.planner.model_configs import ModelConfig
from vllm_split.api.metrics import split_metrics
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.api.session_driver import run_session
from vllm_split.api.ushape import u_shape_unsupported
from vllm_split.version import check_vllm_version

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers
ROUTE = contract.SESSION_PATH
router = APIRouter()


class SplitService:
    """Per-app state: the engine client, the model's identity, open sessions. ``config``
    holds this API server's share of the replica's session and queue limits."""

    def __init__(self, *, engine: Any, model: ModelInfo, config: SplitConfig,
                 controller: AdmissionController | None = None, engines: EngineSet | None = None) -> None:
        self.engine = engine
        self.engines = engines
        self.model = model
        self.config = config
        self.controller = controller
        self.sessions: dict[str, ServerSession] = {}


def _local_model_dir(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


@router.websocket(ROUTE)
async def split_session(ws: WebSocket) -> None:
    service: SplitService = ws.app.state.vllm_split
    await ws.accept()

    async def send(msg: wire.Message) -> None:
        if ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.send_bytes(wire.encode(msg))
            except (WebSocketDisconnect, RuntimeError, OSError):  # the client is gone
                pass

    async def receive() -> bytes | str | None:
        try:
            message = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("bytes") is not None:
            return message["bytes"]
        return message.get("text") or ""  # text frames are refused by wire.decode, with a reason

    if len(service.sessions) >= service.config.max_sessions:
        await send(wire.Error(code=ErrorCode.TOO_MANY_SESSIONS, message=f"server has {len(service.sessions)} open split sessions, the limit is {service.config.max_sessions}; retry later", fatal=True))
        await ws.close(code=1013)
        return
    session = ServerSession(engine=service.engine, model=service.model, config=service.config, send=send,
                            controller=service.controller, engines=service.engines)
    service.sessions[session.session_id] = session
    close_code = 1000
    try:
        await run_session(session=session, receive=receive)
    except SessionError as exc:  # the driver has sent it to the client (engine failures as "internal")
        close_code = 1011 if exc.code == ErrorCode.INTERNAL else 1008
    except (WebSocketDisconnect, asyncio.CancelledError):
        pass
    except Exception:  # a bug in the driver itself (it turns session failures into SessionError)
        logger.exception("vllm-split: session driver failed")
        close_code = 1011
    finally:
        service.sessions.pop(session.session_id, None)
        await session.release()
        if ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.close(code=close_code)
            except (WebSocketDisconnect, RuntimeError, OSError):  # the client left first
                pass


class SplitEndpointPlugin:
    """``vllm.endpoint_plugins`` entry: the session route plus its state."""

    name = "vllm_split"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        check_vllm_version()
        if engine_client is None:
            raise RuntimeError("vllm-split needs an engine: it cannot run on a render-only server")
        model_config = engine_client.model_config
        vllm_config = engine_client.vllm_config
        scheduler_cls = str(vllm_config.scheduler_config.scheduler_cls)
        if "vllm_split" not in scheduler_cls:
            raise RuntimeError(
                f"vllm-split's route is enabled but the scheduler is {scheduler_cls}: start the "
                f"server with `vllm-split serve` or --scheduler-cls vllm_split.engine.scheduler.SplitScheduler "
                f"--worker-cls vllm_split.engine.worker.SplitWorker"
            )
        config = SplitConfig.from_additional_config(vllm_config.additional_config)
        config.check_model(num_layers=model_config.hf_config.num_hidden_layers)
        server_drafts(config, vllm_config.speculative_config)  # drafts need the ClientDrafts spec config
        engines = EngineSet(engine_client)
        config = _api_server_share(config, engines)
        model_dir = _local_model_dir(model_config.model)
        fingerprint = await asyncio.to_thread(model_fingerprint, model_dir)
        model = ModelInfo(
            fingerprint=fingerprint,
            num_layers=model_config.hf_config.num_hidden_layers,
            hidden_size=model_config.get_hidden_size(),
            dtype=model_config.dtype,
            max_model_len=model_config.max_model_len,
            vocab_size=model_config.get_vocab_size(),
            u_shape_unsupported=u_shape_unsupported(vllm_config),
        )
        controller = _controller(engine_client, engines, model, config)
        if config.warmup:
            from vllm_split.api.warmup import warm_up

            index, count = engines.api_server()
            for e in range(index, engines.count, count):  # each engine warmed once, by one API server
                try:
                    await warm_up(engine_client, model, config, engines=engines, engine_index=e)
                except Exception:  # the controller then starts from its prior
                    logger.warning("vllm-split: warm-up of engine %s failed", engines.label(e), exc_info=True)
        await controller.poll_all()
        controller.start()
        state.vllm_split = SplitService(engine=engine_client, model=model, config=config, controller=controller,
                                        engines=engines)
        if config.min_layer > 0:
            _refuse_ordinary_requests(engine_client, config.min_layer)
        logger.info("vllm-split: sessions on %s (model %s, %d layers, fingerprint %s)",
                    ROUTE, model_dir, model.num_layers, fingerprint[:16])


def _api_server_share(config: SplitConfig, engines: EngineSet) -> SplitConfig:
    """This API server's share of the replica's ``max_sessions`` and ``admission_queue`` when
    vLLM runs several (``--api-server-count``): every API server has its own sessions and
    queue, and vLLM hands a new connection to the least-loaded one, so exact shares keep the
    replica's limits (docs/scale_out.md says what is per API server)."""
    index, count = engines.api_server()
    if count == 1:
        return config
    if config.max_sessions < count:
        raise ValueError(f"vllm-split: max_sessions {config.max_sessions} cannot be shared by {count} API servers "
                         f"(--api-server-count): give at least {count}")
    shared = dataclasses.replace(config, max_sessions=share(config.max_sessions, index, count),
                                 admission_queue=share(config.admission_queue, index, count))
    logger.info("vllm-split: API server %d of %d takes %d of %d sessions and %d of %d admission-queue places",
                index, count, shared.max_sessions, config.max_sessions, shared.admission_queue, config.admission_queue)
    return shared


def _controller(engine_client: Any, engines: EngineSet, model: ModelInfo, config: SplitConfig) -> AdmissionController:
    hf_config = engine_client.model_config.hf_config
    index, count = engines.api_server()
    dtype_bytes = max(1, torch_dtype_bytes(model.dtype))
    policy = AdmissionPolicy(
        model=ModelConfig.from_hf_config(hf_config.to_dict(), name=str(engine_client.model_config.model)),
        hidden_bytes=model.hidden_size * dtype_bytes, min_layer=config.min_layer,
        # each API server admits into its share of every engine's request slots
        max_num_seqs=share(engine_client.vllm_config.scheduler_config.max_num_seqs, index, count) or 1,
        offload_above=config.offload_above_pct / 100, placement=config.placement, gather_max_s=config.gather_max_s,
        min_offload_saving=config.min_offload_saving_pct / 100, privacy_floor=config.privacy_floor,
        default_sla=SLA(ttft_s=config.default_ttft_ms / 1000, tpot_s=config.default_tpot_ms / 1000))

    def step_stats(e: int) -> Callable[[int], Awaitable[dict | None]]:
        async def poll(since: int) -> dict | None:
            return await engines.call(e, contract.UTILITY_STEP_STATS, since)
        return poll

    return AdmissionController(
        policy=policy, step_stats=[step_stats(e) for e in range(engines.count)], engine_ranks=engines.ranks,
        first_turn=index,  # API servers start their ties on different engines
        metrics=split_metrics(model.num_layers),
        queue=QueueLimits(limit=config.admission_queue, wait_s=config.admission_wait_ms / 1000))


def torch_dtype_bytes(dtype: Any) -> int:
    return int(getattr(dtype, "itemsize", 4))


def _refuse_ordinary_requests(engine_client: Any, min_layer: int) -> None:
    """A server without layers [0, min_layer) cannot run ordinary requests: refuse them
    with a clear error (the OpenAI routes answer it as a bad request) instead of letting
    them reach the engine. Wraps this app's engine client only."""
    generate = engine_client.generate

    async def split_only_generate(prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any):
        extra = getattr(sampling_params, "extra_args", None) or {}
        if contract.EXTRA_ARGS_KEY not in extra:
            raise ValueError(f"this vllm-split server holds no layers below {min_layer} (min_layer): it serves "
                             f"split sessions at split_layer >= {min_layer} only, not ordinary requests")
        async for output in generate(prompt, sampling_params, *args, **kwargs):
            yield output

    engine_client.generate = split_only_generate


def endpoint_plugin() -> SplitEndpointPlugin:
    return SplitEndpointPlugin()
