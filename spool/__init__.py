"""A mail-agnostic durable spool: atomic deposit, stage moves, claims,
deferral by due time, hold, quarantine, crash recovery and inotify
watching. See :mod:`spool.core` for the on-disk invariants."""

from . import durable
from .core import (
                   Claim,
                   Spool,
                   SpoolError,
                   SpoolFull,
                   SpoolUnavailable,
                   Writer,
                   fsync_dir,
                   id_time,
                   new_id,
                   pid_alive,
                   valid_name,
)

# The watcher, the due index and the group syncs are imported when first
# used (PEP 562): a sendmail call, which only deposits a file, does not
# pay for inotify_simple and the rest (about 6 ms of its start).
_LAZY = {"DueIndex": "due", "GroupSync": "group", "ThreadGroupSync": "group",
         "StageWatcher": "watch"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spool' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["Claim", "DueIndex", "durable", "GroupSync", "Spool", "SpoolError",
           "SpoolFull", "SpoolUnavailable", "StageWatcher", "ThreadGroupSync",
           "Writer", "fsync_dir", "id_time", "new_id", "pid_alive", "valid_name"]
