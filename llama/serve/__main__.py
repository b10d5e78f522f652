"""An OpenAI-compatible HTTP server for a Llama checkpoint.

    python -m llama.serve --ckpt_dir Meta-Llama-3.1-8B-Instruct/ --port 8000
    torchrun --nproc_per_node 8 -m llama.serve --ckpt_dir Meta-Llama-3.1-70B-Instruct/

The first process listens; under torchrun the others follow its engine step by step. SIGTERM (or Ctrl-C) stops
taking requests, lets the running ones finish, and exits with status 0.
"""

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from llama.cli import is_first_process, with_build_options
from llama.fire_commands import run
from llama.generation import Llama
from llama.sampling import check_int
from llama.serve.app import create_app
from llama.serve.metrics import Metrics
from llama.serve.runner import EngineRunner
from llama.serve.slow_clients import WriteDeadline

GRACEFUL_SECONDS = 60  # how long a stop waits for running requests before cancelling them


def _check_flags(port: int, max_queue: int, api_key: str | None, model_name: str | None, stream_timeout: float,
                 **_) -> None:
    check_int("port", port, minimum=0)
    if not stream_timeout > 0:
        raise ValueError(f"stream_timeout must be a number of seconds > 0, got {stream_timeout}")
    if port > 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port}")
    check_int("max_queue", max_queue, minimum=0)
    for name, value in (("api_key", api_key), ("model_name", model_name)):
        if value is not None and not value.strip():
            raise ValueError(f"{name} must not be empty")


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    return sock


def _serve(app, sock: socket.socket, runner: EngineRunner) -> None:
    """Run uvicorn on `sock` in a thread of its own while this thread steps the engine, until SIGTERM or SIGINT;
    then return normally (so the process exits with 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # signals reach the main thread only: handled below

    server = Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACEFUL_SECONDS))

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            runner.stop()  # also when uvicorn failed: the engine's loop must not wait for work forever

    # uvicorn's own handlers re-raise the signal after its graceful shutdown, which would end the process by it.
    previous = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="llama-http")
    http.start()
    try:
        runner.run()  # in the thread that loaded the model, so that one OpenMP team does all the work
    finally:
        server.should_exit = True  # already so, unless the engine's loop itself failed
        http.join()
        for s, handler in previous.items():
            signal.signal(s, handler)


@with_build_options(check=_check_flags, max_seq_len=2048, max_batch_size=8)
def main(
    build_options: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    stream_timeout: float = 60.0,
) -> None:
    """Serve the model in CKPT_DIR over HTTP with OpenAI's API on HOST:PORT (default 127.0.0.1:8000).

    `model_name` is the model's id in the API (default: the checkpoint folder's name); with `api_key`, every
    request but /health needs `Authorization: Bearer API_KEY`; `max_queue` requests may wait for a free slot
    beyond the `max_batch_size` running ones (more are refused with 429); a reply that its client reads nothing of
    for `stream_timeout` seconds is given up (its sequences cancelled) and its connection closed.
    """
    sock = _listen(host, port) if is_first_process() else None
    llama = Llama.build(**build_options)
    if sock is None:
        # Followers stop when the first process releases them (engine.shutdown), not on torchrun's SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        llama.engine.follow()
    else:
        name = model_name or Path(build_options["ckpt_dir"]).resolve().name
        metrics = Metrics(llama.engine, name)
        runner = EngineRunner(llama.engine, build_options["max_batch_size"] + max_queue, metrics.observe)
        print(f"Serving {name} on http://{host}:{sock.getsockname()[1]}", flush=True)
        _serve(WriteDeadline(create_app(llama, runner, name, metrics, api_key), stream_timeout), sock, runner)


if __name__ == "__main__":
    run(main, "llama.serve")
