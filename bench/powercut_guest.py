"""The load inside the power-cut VM (bench/powercut.py): run ``msa daemon``
on the spool disk and submit messages from several clients at once; print
``@@ACK <queue id> <sha256 of the body>`` on the console after every 250,
so the host knows what was acknowledged even when the power goes the next
instant. Runs until the host cuts the power."""

from __future__ import annotations

import hashlib
import os
import random
import smtplib
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = 4


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


class SMTP(smtplib.SMTP):
    """smtplib.SMTP that keeps the queue id of the last 250 to DATA."""

    last_qid = ""

    def data(self, msg):
        code, text = super().data(msg)
        if code == 250:
            self.last_qid = text.decode().rsplit(" ", 1)[-1]
        return code, text


def client(port: int, seed: int) -> None:
    rnd = random.Random(seed * 7919 + os.getpid())
    while True:
        try:
            with SMTP("127.0.0.1", port, timeout=300) as s:
                while True:
                    size = rnd.choice((200, 2000, 20000, 60000))
                    text = rnd.randbytes(size // 2 + 1).hex().encode()[:size]
                    # hex lines: nothing to dot-stuff, so this is what is stored
                    text = b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
                    text += b"\r\n"
                    head = f"Subject: power cut {seed}\r\n\r\n".encode()
                    refused = s.sendmail("load@bench.test", ["rcpt@example.test"], head + text)
                    assert not refused
                    say(f"@@ACK {s.last_qid} {hashlib.sha256(text).hexdigest()}")
        except (OSError, smtplib.SMTPException) as exc:
            say(f"@@CLIENT {seed} {type(exc).__name__}: {exc}")
            time.sleep(0.5)


def main() -> int:
    config, port = sys.argv[1], int(sys.argv[2])
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "msa"), "daemon",
                               "--config", config, "--foreground"], env=env)
    deadline = time.monotonic() + 600
    while True:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=60).quit()
            break
        except OSError:
            if daemon.poll() is not None or time.monotonic() > deadline:
                say(f"@@FAILED daemon did not start ({daemon.poll()})")
                return 1
            time.sleep(0.5)
    say("@@READY")
    for i in range(CLIENTS):
        threading.Thread(target=client, args=(port, i), daemon=True).start()
    daemon.wait()
    say(f"@@FAILED daemon exited {daemon.returncode}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
