"""Servers for tests (and benchmarks), each on a free port of 127.0.0.1 and stopped when
its `with` block ends: the app on uvicorn in a thread (`Server`), `cellvec serve` in a
process (`serve_process`), a folder over plain HTTP (`static_server`), and a local S3
server (`s3_server`, moto's server mode).

The S3 server runs in a child process that stops by itself: when the process that
started it goes away, or after `lifetime_s`, whichever comes first, so a killed test
run leaves nothing listening. Before it is handed out it must answer a conditional
PUT (`If-None-Match: *` on an existing key) with 412: Lance commits a new table
version with such a PUT, and a server that ignored it would let two writers
overwrite each other's commits.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

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
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"the test server on port {self.port} did not start in 30 s")
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
def static_server(directory, *, lifetime_s: float = 300, redirect: str | None = None):
    """Files of `directory` over plain HTTP on a free port of 127.0.0.1 (a thread), as a web
    server or a bucket's public URL serves a bundle; stopped on exit, or by itself after
    `lifetime_s`. With `redirect`, every request is answered 302 to `redirect` + its path.
    Yields (base URL, list of the paths requested, in order)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requested = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            requested.append(self.path)
            if redirect is None:
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", redirect + self.path)
            self.end_headers()

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


# -- a local S3 server ----------------------------------------------------------------

ACCESS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"

_CHILD = r"""
import os, sys, time
from moto.server import ThreadedMotoServer

parent, lifetime = int(sys.argv[1]), float(sys.argv[2])
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline and os.getppid() == parent:
    time.sleep(0.2)
server.stop()
"""


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def storage_options(self) -> dict[str, str]:
        """Lance storage options that reach this server."""
        return {**ACCESS, "aws_endpoint": self.endpoint, "aws_region": REGION, "allow_http": "true"}

    def env(self) -> dict[str, str]:
        """The same as environment variables (as a user with an S3-compatible server sets them)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": ACCESS["aws_secret_access_key"],
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS["aws_access_key_id"],
            aws_secret_access_key=ACCESS["aws_secret_access_key"],
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def conditional_put_status(self, bucket: str) -> int:
        """HTTP status of a second `If-None-Match: *` PUT of one key (412 when honoured)."""
        from botocore.exceptions import ClientError

        s3 = self.client()
        s3.put_object(Bucket=bucket, Key="probe", Body=b"1")
        try:
            r = s3.put_object(Bucket=bucket, Key="probe", Body=b"2", IfNoneMatch="*")
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
        return int(r["ResponseMetadata"]["HTTPStatusCode"])


@contextlib.contextmanager
def s3_server(*, lifetime_s: float = 1800, start_timeout_s: float = 60):
    """Start moto's S3 server on a free loopback port; stop it on exit (bounded wait)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(os.getpid()), str(lifetime_s)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], start_timeout_s)
            line = proc.stdout.readline().strip() if ready else ""
            if not line.isdigit():
                log.seek(0)
                raise RuntimeError(
                    f"moto's S3 server did not start within {start_timeout_s:.0f} s "
                    f"(install the dev extra: pip install -e '.[dev]'): {log.read()[-2000:]}"
                )
            server = S3Server(f"http://127.0.0.1:{line}", proc)
            probe = server.create_bucket(f"probe-{os.getpid()}-{int(time.time() * 1000)}")
            status = server.conditional_put_status(probe)
            if status != 412:
                raise RuntimeError(
                    f"This moto answers a conditional PUT on an existing key with {status}, "
                    "not 412; Lance's commits need 412. Install the version pyproject's dev "
                    "extra pins."
                )
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
