"""Running msa from a checkout (``bin/msa``, ``bin/sendmail``,
``bin/mailq``): the scripts run in the project's virtual environment,
``.venv`` beside ``bin/`` (``make demo`` and ``make test`` make it), when
there is one, whatever ``python3`` started them (cron's, mailx's, a
shell's): they re-execute themselves with the venv's interpreter, where
msa's dependencies are. Stdlib only: it runs before they are importable.
"""

from __future__ import annotations

import os
import sys

VENV = ".venv"


def use_project_venv(script: str) -> None:
    """Re-execute ``script`` with the checkout's venv interpreter unless
    it already runs there (or there is none); returns only then."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(script)))
    venv = os.path.join(root, VENV)
    python = os.path.join(venv, "bin", "python3")
    if not os.path.exists(python) or os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    os.execv(python, [python, script, *sys.argv[1:]])
