"""Process plumbing for the daemon and the tutorial's Step 5 (python-slimta's
``slimta.system``): dropping root, detaching, pid files, stdio.

Invariants:

- :func:`drop_privileges` changes the group list and gid before the uid
  (after the uid change it could not), and checks that root cannot be
  regained; it is a no-op when not running as root.
- A pid file names a live process or is stale; :func:`write_pidfile`
  refuses to start a second daemon over a live one and replaces a stale
  file atomically.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from spool import pid_alive  # a pid file names a live process or is stale


class SystemError_(OSError):
    """A process-level step failed (unknown user, daemon already running)."""


def drop_privileges(user: str | None = None, group: str | None = None) -> bool:
    """Become ``user`` (and ``group``, default: the user's primary group).
    Returns True when privileges were dropped."""
    if os.getuid() != 0 or not user:
        return False
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SystemError_(f"unknown user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise SystemError_(f"unknown group {group!r}") from None
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        return True
    raise SystemError_("could still regain root after dropping privileges")


def redirect_stdio(stdin: str = os.devnull, stdout: str = os.devnull,
                   stderr: str = os.devnull) -> None:
    """Point fds 0, 1, 2 at files (``/dev/null`` by default), as a daemon
    that left its terminal must."""
    for fd, path, flags in ((0, stdin, os.O_RDONLY),
                            (1, stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                            (2, stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
        for stream in (sys.stdin, sys.stdout, sys.stderr):
            if stream is not None and _fileno(stream) == fd and fd:
                stream.flush()
        new = os.open(path, flags, 0o640)
        if new != fd:
            os.dup2(new, fd)
            os.close(new)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def write_pidfile(path: str) -> None:
    pid = read_pidfile(path)
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        raise SystemError_(f"{path}: already running as pid {pid}")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile(path: str) -> None:
    if read_pidfile(path) == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def detach() -> None:
    """Become a daemon (python-daemon's DaemonContext: fork, setsid, chdir
    /, umask 022, stdio to /dev/null). Signals stay with the caller's
    event loop (empty signal map)."""
    import daemon
    ctx = daemon.DaemonContext(working_directory="/", umask=0o022, signal_map={},
                               prevent_core=False)
    ctx.open()


def sd_notify(state: str) -> bool:
    """Tell systemd about the service's state (``READY=1``,
    ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``) over
    ``$NOTIFY_SOCKET``, the datagram protocol of sd_notify(3): a Unix
    socket path, or ``@name`` for the abstract namespace. Without the
    variable (not under systemd, or ``Type=`` other than notify) nothing
    happens. Returns whether a datagram was sent; a failure to send is not
    an error of the daemon's."""
    import socket
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False
    return True
