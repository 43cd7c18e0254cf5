"""Servers for tests: the app on uvicorn in a thread, or `cellvec serve` in a process,
both on a free port of 127.0.0.1 and stopped when the `with` block ends."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *a):
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def serve_process(*args, env: dict | None = None, timeout_s: float = 180):
    """`cellvec serve ARGS` in a new process on a free port; its URL once /readyz answers
    200 (workers start slowly on busy cores), the process stopped on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellvec.cli", "-q", "serve", *map(str, args), "--port", str(port)],
        env=dict(os.environ) if env is None else env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        ready, deadline = False, time.monotonic() + timeout_s
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            with contextlib.suppress(httpx.TransportError):
                ready = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        assert proc.poll() is None, proc.stderr.read()
        assert ready, f"cellvec serve {' '.join(map(str, args))} was not ready in {timeout_s} s"
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def static_server(directory, *, lifetime_s: float = 300):
    """Files of `directory` over plain HTTP on a free port of 127.0.0.1 (a thread), as a web
    server or a bucket's public URL serves a bundle; stopped on exit, or by itself after
    `lifetime_s`. Yields (base URL, list of the paths requested, in order)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requested = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory))
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    timer = threading.Timer(lifetime_s, httpd.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requested
    finally:
        timer.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
