"""`neuronserve serve` prints ready only once every replica has warmed up."""

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from neuronserve.serve.serve_cli import wait_ready


@pytest.fixture
def ready_server():
    """A fake /v2/health/ready whose answers come from `answers`, an iterator of (status, replica)."""
    state = {"answers": iter(()), "polls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["polls"] += 1
            status, replica = next(state["answers"], (503, None))
            body = {"ready": True, "replica": replica} if status == 200 else {"ready": False, "error": "warming up"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()


def test_waits_for_every_replica(ready_server):
    url, state = ready_server
    # Replica a is warm first; b answers 503 until its fourth turn.
    state["answers"] = iter([(503, None), (200, "a"), (503, None), (200, "a"), (503, None), (200, "a"), (200, "b")])
    assert wait_ready(url, 10, threading.Event(), replicas=2, interval_s=0.01)
    assert state["polls"] == 7


def test_sticky_balancer_settles_after_a_run_of_200s(ready_server):
    url, state = ready_server
    state["answers"] = itertools.repeat((200, "a"))
    assert wait_ready(url, 10, threading.Event(), replicas=2, interval_s=0.01, settle_polls=5)
    assert state["polls"] == 5


def test_never_ready_times_out(ready_server):
    url, state = ready_server
    assert not wait_ready(url, 0.3, threading.Event(), replicas=1, interval_s=0.01)
    assert state["polls"] > 3
