"""bin/ scripts run in the checkout's .venv whichever python3 starts them
(msa.checkout), and .ci/setup makes that venv from the interpreter it is
told."""

from __future__ import annotations

import os
import subprocess
import sys

from tests import support

SCRIPT = """import os, sys
sys.path.insert(0, {root!r})
from msa.checkout import use_project_venv
use_project_venv(__file__)
print("not re-executed", sys.prefix)
"""


def _checkout(tmp_path, with_venv: bool):
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "tool"
    script.write_text(SCRIPT.format(root=str(support.ROOT)))
    if with_venv:
        venv_bin = tmp_path / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        fake = venv_bin / "python3"   # records how it was run
        fake.write_text(f'#!/bin/sh\necho "venv python: $*" > {tmp_path}/ran\n')
        fake.chmod(0o755)
    return script


def test_a_script_reexecutes_itself_in_the_venv(tmp_path):
    script = _checkout(tmp_path, with_venv=True)
    p = subprocess.run([sys.executable, str(script), "-bp", "x y"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "not re-executed" not in p.stdout
    assert (tmp_path / "ran").read_text() == (
        f"venv python: {script.resolve()} -bp x y\n")


def test_without_a_venv_the_script_runs_where_it_was_started(tmp_path):
    script = _checkout(tmp_path, with_venv=False)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.startswith("not re-executed"), (p.stdout, p.stderr)
    assert not (tmp_path / "ran").exists()


def test_the_real_scripts_use_this_venv():
    """The suite runs in the venv .ci/setup made; bin/sendmail started by
    another interpreter ends up in it (it imports msa's dependencies)."""
    venv = support.ROOT / ".venv"
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        import pytest
        pytest.skip("the tests are not running in the checkout's .venv")
    other = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    env = support.msa_env()
    env.pop("PYTHONPATH", None)
    env.pop("MSA_CONFIG", None)
    code = ("import runpy, sys; sys.argv = ['sendmail', '-C', '/nonexistent', '-bp'];"
            f"runpy.run_path({str(support.BIN / 'sendmail')!r}, run_name='__main__')")
    p = subprocess.run([other, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    # Exit 78 from msa itself: it got past its imports in the venv.
    assert p.returncode == 78 and "/nonexistent" in p.stderr, (p.returncode, p.stderr)
