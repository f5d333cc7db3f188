"""The mail spool: :class:`spool.Spool` with msa's stages and file format.

``maildrop/`` is written by the unprivileged ``sendmail`` command of any
local user, so it and ``tmp/`` are world-writable, sticky and not listable
(Postfix's maildrop is 1730 with a setgid ``postdrop``; with no setgid
helper we allow every user, as nullmailer's queue does). They are also
setgid: a file a user drops there belongs to the directory's group, which
is the daemon's group (``[daemon] group``, or the primary group of
``[daemon] user``), so the daemon can read the 0640 file after it has
dropped root. Every other stage is the daemon's alone.
"""

from __future__ import annotations

import grp
import os
import pwd

from msa.config import Config
from spool import Spool

MODES = {"tmp": 0o3733, "maildrop": 0o3733}
# Any local user may put a file there: claimed by a lock file in claims/,
# never by opening the file before it is checked (msa.cleanup.maildrop).
UNTRUSTED_STAGES = ("maildrop",)


def daemon_gid(cfg: Config) -> int | None:
    """The group the daemon runs as, or None when it keeps root's."""
    try:
        if cfg.daemon.group:
            return grp.getgrnam(cfg.daemon.group).gr_gid
        if cfg.daemon.user:
            return pwd.getpwnam(cfg.daemon.user).pw_gid
    except KeyError:
        return None
    return None


def open_spool(cfg: Config, create: bool = True) -> Spool:
    spool = Spool(cfg.spool.root, cfg.stages(), modes=MODES, create=create,
                  claim_files=UNTRUSTED_STAGES, sync=cfg.spool.sync)
    gid = daemon_gid(cfg)
    if create and gid is not None and os.geteuid() == 0:
        for name in MODES:
            d = spool.root / name
            if d.stat().st_gid != gid:
                os.chown(d, -1, gid)
                os.chmod(d, MODES[name])  # chown clears the setgid bit
    return spool
