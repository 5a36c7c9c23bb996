"""`neuronserve serve` deploys while Serve's proxy starts: the controller is waited for, the proxy after the deploy."""

import threading

import pytest


class _Serve:
    """`serve.start` that blocks until released, or fails."""

    def __init__(self, error: Exception | None = None):
        self.release, self.error, self.calls = threading.Event(), error, []

    def start(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        assert self.release.wait(10)


@pytest.fixture
def actors(monkeypatch):
    import ray

    created = set()

    def get_actor(name, namespace=None):
        if (name, namespace) not in created:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return object()

    monkeypatch.setattr(ray, "get_actor", get_actor)
    return created


def test_the_deploy_waits_for_the_controller_only_and_the_proxy_after(actors):
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from neuronserve.serve.serve_cli import _ServeStart

    serve, stop = _Serve(), threading.Event()
    starting = _ServeStart(serve, {"host": "127.0.0.1", "port": 1}, None)
    threading.Timer(0.2, actors.add, args=[(SERVE_CONTROLLER_NAME, SERVE_NAMESPACE)]).start()
    assert starting.wait_for_controller(stop) is None
    assert not starting._done.is_set()  # serve.start still waits for its proxy: the deploy need not
    threading.Timer(0.2, serve.release.set).start()
    assert starting.wait_for_proxies(stop) is None
    assert serve.calls == [{"http_options": {"host": "127.0.0.1", "port": 1}, "logging_config": None}]


def test_a_failed_serve_start_is_one_message(actors):
    from neuronserve.serve.serve_cli import _ServeStart

    starting = _ServeStart(_Serve(RuntimeError("port 1 is taken")), {}, None)
    assert starting.wait_for_controller(threading.Event()) == "Ray Serve did not start: port 1 is taken"
    assert starting.wait_for_proxies(threading.Event()) == "Ray Serve did not start: port 1 is taken"


def test_a_signal_while_serve_starts_stops_the_wait(actors):
    from neuronserve.serve.serve_cli import _ServeStart

    serve, stop = _Serve(), threading.Event()
    starting = _ServeStart(serve, {}, None)
    threading.Timer(0.2, stop.set).start()
    assert starting.wait_for_controller(stop) == "stopped while Ray Serve was starting"
    assert starting.wait_for_proxies(stop) == "stopped while Ray Serve was starting"
    serve.release.set()
