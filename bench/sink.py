"""The destination: Postfix's ``smtp-sink`` with its running counter.

``smtp-sink -c`` prints ``sess=S quit=Q mesg=M`` followed by CR each time a
session ends, a QUIT arrives or a message's final "." is received; a reader
thread parses that stream so the harness knows, to a few milliseconds,
when the sink has received its Nth message.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

from .procs import die_with_parent, end_watchdog, watchdog

SMTP_SINK = "/usr/sbin/smtp-sink"
_COUNTER = re.compile(rb"mesg=(\d+)")


def parse_counter(chunk: bytes) -> int | None:
    """The last ``mesg=`` value in a piece of smtp-sink -c output."""
    found = _COUNTER.findall(chunk)
    return int(found[-1]) if found else None


class Sink:
    """A running smtp-sink on 127.0.0.1:``port`` counting messages."""

    def __init__(self, port: int, backlog: int = 1024, max_sessions: int = 1024):
        self.port = port
        self.count = 0
        self.first_time: float | None = None
        self._target: int | None = None
        self._target_time: float | None = None
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", "-u", "nobody", "-m", str(max_sessions),
             f"127.0.0.1:{port}", str(backlog)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent)
        # smtp-sink drops root (-u nobody), which clears die_with_parent.
        self._dog = watchdog(f"kill {self.proc.pid} 2>/dev/null")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            data = self.proc.stdout.read1(65536)
            if not data:
                return
            buf = (buf + data)[-256:]
            value = parse_counter(buf[:buf.rfind(b"\r") + 1] if b"\r" in buf else b"")
            if value is None:
                continue
            now = time.monotonic()
            with self._cond:
                if value > self.count:
                    self.count = value
                    if self.first_time is None:
                        self.first_time = now
                    if self._target is not None and self._target_time is None \
                            and value >= self._target:
                        self._target_time = now
                    self._cond.notify_all()

    def expect(self, target: int) -> None:
        """Record the time the count first reaches ``target`` (call before
        starting the load)."""
        with self._cond:
            self._target, self._target_time = target, None
            self.first_time = None if self.count == 0 else self.first_time
            if self.count >= target:
                self._target_time = time.monotonic()

    def wait(self, timeout: float) -> float | None:
        """Wait for the expected count; returns the monotonic time it was
        reached, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._target_time is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.5))
            return self._target_time

    def wait_first(self, timeout: float) -> float | None:
        """Wait for the first message ever; its monotonic time or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.first_time is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            return self.first_time

    def stop(self) -> None:
        end_watchdog(self._dog)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._thread.join(5)
