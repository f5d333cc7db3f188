"""The tutorial's names in one place, and a way to run them.

"The tutorial" throughout msa is python-slimta's mail submission agent
tutorial, which msa grew from; ``examples/tutorial.py`` follows it step by
step, and everything it does is possible from Python::

    from msa.api import (MxSmtpRelay, Queue, SpoolStorage, SmtpEdge, SmtpValidators,
                         Auth, CredentialsInvalidError, AddDateHeader, ...)
    from msa import system, api

    relay = MxSmtpRelay(tls=tls_args, connect_timeout=20, command_timeout=10,
                        data_timeout=20, idle_timeout=30)            # Step 1
    queue = Queue(SpoolStorage('/var/spool/msa'), relay)              # Step 2
    queue.add_policy(AddDateHeader()) ...                             # Step 3
    queue.start()
    edge = SmtpEdge(('', 587), queue, tls=tls_args,
                    validator_class=MyValidators, auth_class=MyAuth)  # Step 4
    ssl_edge = SmtpEdge(('', 465), queue, tls=tls_args, tls_immediately=True, ...)
    api.start(edge, ssl_edge)          # bind the ports (slimta's gevent.sleep)
    system.drop_privileges('smtp-user', 'smtp-user')                  # Step 5
    system.redirect_stdio()
    api.run_forever(queue, edge, ssl_edge)                            # Step 6

Edges run in the calling thread's asyncio loop (:func:`loop`); a queue runs
its watcher and runner in its own thread. :func:`run_forever` returns after
SIGINT or SIGTERM, once everything has stopped. Names are imported lazily,
so ``import msa.api`` never fails because an optional part is missing.
"""

from __future__ import annotations

import asyncio
import importlib
import signal

from msa import system  # noqa: F401 (the tutorial's ``system`` module)

_NAMES = {
    "MxSmtpRelay": "msa.delivery.relay", "SmarthostRelay": "msa.delivery.relay",
    "Queue": "msa.queue", "SpoolStorage": "msa.queue",
    "SmtpEdge": "msa.submission.edge", "SmtpValidators": "msa.submission.validators",
    "Auth": "msa.submission.auth", "CredentialsInvalidError": "msa.submission.auth",
    "AddDateHeader": "msa.cleanup.policies", "AddMessageIdHeader": "msa.cleanup.policies",
    "AddReceivedHeader": "msa.cleanup.policies", "RemoveBccHeader": "msa.cleanup.policies",
    "Forward": "msa.cleanup.policies", "RecipientDomainSplit": "msa.cleanup.policies",
    "drop_privileges": "msa.system", "redirect_stdio": "msa.system",
}

__all__ = [*_NAMES, "loop", "start", "run_forever", "system"]

_loop: asyncio.AbstractEventLoop | None = None
_started: set[int] = set()


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'msa.api' has no attribute {name!r}")


def loop() -> asyncio.AbstractEventLoop:
    """The loop edges run in (one per program, made on first use)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def _is_queue(service) -> bool:
    return hasattr(service, "add_policy") and hasattr(service, "start")


def start(*services) -> None:
    """Start queues and bind edges now (each only once), so privileges can
    be dropped before :func:`run_forever`."""
    for service in services:
        if id(service) in _started:
            continue
        if _is_queue(service):
            service.start()
        else:
            loop().run_until_complete(service.start())
        _started.add(id(service))


def run_forever(*services, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """Run until one of ``signals``; then stop the edges (transactions in
    flight finish) and the queues (work in flight finishes)."""
    start(*services)
    lp = loop()
    stop = asyncio.Event()
    for sig in signals:
        lp.add_signal_handler(sig, stop.set)
    try:
        lp.run_until_complete(stop.wait())
    finally:
        for sig in signals:
            lp.remove_signal_handler(sig)
        edges = [s for s in services if not _is_queue(s)]
        if edges:
            lp.run_until_complete(asyncio.gather(*(e.stop() for e in edges),
                                                 return_exceptions=True))
        for queue in (s for s in services if _is_queue(s)):
            queue.stop()
        for s in services:
            _started.discard(id(s))
