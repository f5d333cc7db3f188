"""The mail spool: :class:`spool.Spool` with msa's stages and file format.

``maildrop/`` is written by the unprivileged ``sendmail`` command of any
local user, so it and ``tmp/`` are world-writable, sticky and not listable
(mode 1733, as Postfix's maildrop). Every other stage is the daemon's.
"""

from __future__ import annotations

from spool import Spool

from .config import Config

MODES = {"tmp": 0o1733, "maildrop": 0o1733}


def open_spool(cfg: Config, create: bool = True) -> Spool:
    return Spool(cfg.spool.root, cfg.stages(), modes=MODES, create=create)
