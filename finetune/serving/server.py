"""``finetune serve``: loads MODEL (as ``generate`` does) beside a running uvicorn, then answers OpenAI requests.

One process: uvicorn's asyncio loop in the main thread, one engine thread per served model. SIGTERM stops taking
connections, lets the running requests finish (up to ``grace`` seconds), stops the engines and exits 0.
"""

import signal
import socket
import sys
import threading
from pathlib import Path

from finetune.generation import DRAFT_TOKENS
from finetune.serving.api import Served, State, build_app
from finetune.serving.engine import ENCODER_DECODER_LIMIT, Engine, EngineThread


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's bound TCP socket. It names IPPROTO_TCP and sets TCP_NODELAY (accepted connections inherit it):
    asyncio sets NODELAY only on sockets whose proto is IPPROTO_TCP, and without it Nagle holds a response's body
    until the client's delayed ACK of its headers, 40 ms on every keep-alive request and stream chunk."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ckpt: str = "best",
    device: str = "cpu",
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = 1 << 20,
    grace: float = 30.0,
    adapters: dict[str, str] | None = None,
    draft: str | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    quantize=None,
    max_source_tokens: int | None = None,
) -> int:
    """Serves ``model`` under ``name``, and each LoRA run of ``adapters`` ({name: run folder}, trained on
    ``model``) unmerged over its weights under its own name, each in an engine (a batch) of its own. ``draft``: a
    smaller model of the same tokenizer that every engine decodes speculatively with, ``draft_tokens`` per step.
    ``quantize``: a ``finetune.quant.QuantConfig`` applied to ``model`` after loading (``--quantize``). An
    encoder-decoder (T5) encodes sources of up to ``max_source_tokens`` and decodes up to ``max_tokens_limit``
    tokens (both default ``ENCODER_DECODER_LIMIT``): its positions set no limit, these bound its caches."""
    import uvicorn

    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-queue", max_queue),
        ("--max-tokens-limit", max_tokens_limit),
        ("--draft-tokens", draft_tokens),
        ("--max-source-tokens", max_source_tokens),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if quantize is not None and adapters:  # unmerged LoRA layers need the base's float weights under them
        raise ValueError("--quantize: not with --adapter (adapters are served unmerged over float weights); "
                         "quantize each merged export instead")  # fmt: skip
    name = name or Path(model).resolve().name
    if name in (adapters or {}):
        raise ValueError(f"--adapter {name}: is the served model's name; name the adapter otherwise (or use --name)")
    state = State(name or Path(model).resolve().name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                  max_body_bytes=max_body_bytes)  # fmt: skip
    sock = listening_socket(host, port)  # before loading: a taken port fails at once
    bound = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=grace, access_log=False)
    )

    def load() -> None:
        from finetune import inference

        try:
            loaded = inference.load(model, ckpt=ckpt, device=device, quantize=quantize)
            small = None
            if draft is not None:
                small = inference.load(draft, device=device, what="--draft")
                inference.check_draft(loaded, small)
            tuned = {n: inference.load_adapter(loaded, folder, ckpt=ckpt) for n, folder in (adapters or {}).items()}
            served = {state.name: loaded, **tuned}
            thread = EngineThread()  # every engine steps on one thread: one OpenMP pool (see EngineThread)
            engines = {n: Engine(m.model, max_batch=max_batch, max_queue=max_queue, metrics=state.metrics,
                                 thread=thread, draft=small and small.model, draft_tokens=draft_tokens,
                                 max_source_tokens=max_source_tokens or ENCODER_DECODER_LIMIT,
                                 max_new_tokens=max_tokens_limit or ENCODER_DECODER_LIMIT)
                       for n, m in served.items()}  # fmt: skip
        except Exception as e:  # noqa: BLE001  (reported, and the server exits 2)
            state.load_error = f"{type(e).__name__}: {e}"
            print(f"finetune serve: error: {e}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        for n, m in served.items():
            state.models[n] = Served(m, engines[n].start())
            print(f"finetune serve: {n} loaded ({m.source})", file=sys.stderr, flush=True)

    print(f"finetune serve: listening on http://{host}:{bound}", flush=True)
    # Loading runs off the main thread (which then only serves HTTP), and its thread ends before the first request:
    # torch work on a second live thread would leave a second OpenMP pool beside the engine thread's, libgomp then
    # throttles its workers' spinning when they outnumber the cores, and every small op of a decode step pays a
    # futex wake-up (3.6x slower steps on 2 cores, measured). For the same reason every engine (the model and each
    # --adapter) steps on one EngineThread.
    loader = threading.Thread(target=load, name="finetune-load", daemon=True)
    loader.start()
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler lets serve return 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        loader.join(timeout=grace)
        for served in state.models.values():
            served.engine.stop(timeout=grace)
    return 2 if state.load_error else 0
