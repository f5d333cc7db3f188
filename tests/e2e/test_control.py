"""The control socket: one line in, one line out; no daemon → None."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from msa import config
from msa.admin.control import ControlServer, permitted, send_control, send_to


def _cfg(path):
    cfg = config.Config()
    cfg.daemon.control_socket = str(path)
    return cfg


class _Served:
    """A ControlServer running in a thread's event loop."""

    def __init__(self, path, handlers):
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(str(path), handlers)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_no_daemon_is_none(tmp_path):
    assert send_control(_cfg(tmp_path / "control"), "flush") is None
    # A stale socket file that nobody listens on is not an answer either.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "stale"))
    s.close()
    assert send_to(str(tmp_path / "stale"), "flush") is None


def test_commands_answer_one_line(tmp_path):
    flushed = []

    async def flush():
        flushed.append(1)
        return "flushing"

    served = _Served(tmp_path / "control", {"flush": flush, "status": lambda: "up 3"})
    try:
        cfg = _cfg(tmp_path / "control")
        assert send_control(cfg, "flush") == "ok flushing"
        assert flushed == [1]
        assert send_control(cfg, "status\n") == "ok up 3"
        assert send_control(cfg, "bogus").startswith("error unknown command")
        # An overlong line is refused, not read without bound.
        assert send_control(cfg, "x" * 5000).startswith("error")
    finally:
        served.close()
    assert not os.path.exists(tmp_path / "control")


def test_handler_error_is_reported_and_server_survives(tmp_path):
    def boom():
        raise RuntimeError("kaput")

    served = _Served(tmp_path / "c", {"reload": boom, "status": lambda: ""})
    try:
        assert send_to(str(tmp_path / "c"), "reload") == "error reload: kaput"
        assert send_to(str(tmp_path / "c"), "status") == "ok"
    finally:
        served.close()


def test_long_socket_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control"
    assert len(str(path)) > 108
    served = _Served(path, {"status": lambda: "long"})
    try:
        assert send_to(str(path), "status") == "ok long"
    finally:
        served.close()


def test_live_socket_is_not_stolen(tmp_path):
    served = _Served(tmp_path / "c", {"status": lambda: ""})
    try:
        second = ControlServer(str(tmp_path / "c"), {})
        with pytest.raises(OSError):
            asyncio.run(second.start())
    finally:
        served.close()


def test_reload_needs_privilege():
    assert permitted("flush", 1234, 0)
    assert permitted("reload", 0, 0)
    assert permitted("reload", 1000, 1000)
    assert not permitted("reload", 1234, 0)
    assert not permitted("reload", None, 0)
