"""A pangu server inside the test process: uvicorn in a thread on 127.0.0.1 and a free port,
stopped when the `with` block ends (also on failure)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from pangu_fn.serve.app import Served, ServerOptions, create_app


@contextmanager
def running_server(load: Callable[[], Served], options: ServerOptions = ServerOptions(),  # noqa: B008
                   wait_ready: bool = True, timeout: float = 120.0) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) once the server listens (and, with
    `wait_ready`, once the model is loaded). Raises TimeoutError past `timeout` seconds."""
    ready, errors = threading.Event(), []

    def on_ready(error: Exception | None) -> None:
        if error is not None:
            errors.append(error)
        ready.set()

    server = uvicorn.Server(uvicorn.Config(create_app(load, options, on_ready), host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise TimeoutError("the test server did not start")
            time.sleep(0.02)
        if wait_ready and not ready.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the test server's model did not load")
        if errors:
            raise errors[0]
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
