"""The README's demo: `msa demo` starts the daemon on loopback and the
README's swaks and curl commands submit to it."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys

from tests import support

README = (support.ROOT / "README.md").read_text()


def _readme_command(prefix: str) -> str:
    lines = [line for line in README.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in README.md"
    return lines[0]


def _demo(tmp_path, *args):
    return subprocess.run([sys.executable, str(support.BIN / "msa"), "demo", "--var", "var",
                           *args], cwd=tmp_path, env=support.msa_env(), capture_output=True,
                          text=True, timeout=60)


def test_readme_has_exactly_the_two_setup_commands():
    block = README.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == [
        "make demo", "make test"]


def test_demo_setup_is_idempotent(tmp_path):
    first = _demo(tmp_path, "--setup-only")
    assert first.returncode == 0, first.stderr
    assert "added user 'demo'" in first.stdout and "swaks --server 127.0.0.1" in first.stdout
    files = {p: p.read_bytes() for p in (tmp_path / "var").rglob("*") if p.is_file()}
    second = _demo(tmp_path, "--setup-only")
    assert second.returncode == 0 and "already set up, nothing changed" in second.stdout
    assert {p: p.read_bytes() for p in files} == files
    # The command the demo prints is the README's.
    assert _readme_command("swaks ") in second.stdout


def test_demo_runs_and_the_readme_examples_submit(tmp_path):
    port, ssl_port, sink = support.free_port(), support.free_port(), support.free_port()
    proc = support.Proc([sys.executable, str(support.BIN / "msa"), "demo", "--var", "var",
                         "--port", str(port), "--ssl-port", str(ssl_port),
                         "--sink-port", str(sink)], cwd=tmp_path, env=support.msa_env())
    try:
        support.wait_port(port)
        support.wait_port(ssl_port)
        swaks = _readme_command("swaks ").replace("--port 2587", f"--port {port}")
        done = subprocess.run(shlex.split(swaks), cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"<~  250 2\.0\.0 Ok: queued as (\w+)", done.stdout)
        printf = _readme_command("printf 'From: demo@example.org")
        curl = _readme_command("curl ").replace("127.0.0.1:2465", f"127.0.0.1:{ssl_port}")
        done = subprocess.run(["bash", "-c", f"{printf}\n{curl}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        from msa import config
        from msa.store import open_spool
        sp = open_spool(config.load(str(tmp_path / "var" / "msa.toml")))

        def demo_mail():
            from msa.message.queuefile import load
            senders = []
            for stage in [*sp.stages, *sp.deferred_stages()]:
                for name in sp.names(stage):
                    senders.append(load(sp.path(stage, name))[0].sender)
            return senders.count("demo@example.org") >= 2

        support.wait_for(demo_mail, what="both messages in the spool")
        proc.p.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.p.wait(30) == 0
    finally:
        out = proc.output()
    assert "Running msa daemon in the foreground" in out, out
