"""A mail-agnostic durable spool: atomic deposit, stage moves, claims,
deferral by due time, hold, quarantine, crash recovery and inotify
watching. See :mod:`spool.core` for the on-disk invariants."""

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
from .due import DueIndex
from .group import GroupSync, ThreadGroupSync
from .watch import StageWatcher

__all__ = ["Claim", "DueIndex", "GroupSync", "Spool", "SpoolError",
           "SpoolFull", "SpoolUnavailable", "StageWatcher", "ThreadGroupSync",
           "Writer", "fsync_dir", "id_time", "new_id", "pid_alive", "valid_name"]
