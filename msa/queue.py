"""The tutorial's ``Queue`` (Step 2 and 3) on top of the spool.

``Queue(SpoolStorage('/var/spool/msa'), relay)`` is what ``msa daemon``
builds from a config file, for a Python program: the storage is the spool
directory, :meth:`Queue.add_policy` appends a policy stage, and
:meth:`Queue.start` runs the watcher (policy stages) and the delivery
runner in a background thread with its own asyncio loop (the gevent
Greenlet of python-slimta). Edges only write into the spool, so they may
run in any loop or process.

Invariants: each added policy gets its own stage directory
``policy-<name>`` (numbered when a name repeats), in the order added, so a
crash resumes exactly where it stopped; policies cannot be added once the
queue has started (the stages of the spool are fixed then).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import threading

from msa import config
from msa.cleanup.policies import Policy, check_stage
from msa.store import MODES, UNTRUSTED_STAGES
from spool import Spool

log = logging.getLogger("msa.queue")


class SpoolStorage:
    """Where a :class:`Queue` keeps messages: a spool directory (durable,
    readable with ``ls`` and ``cat``; see ``msa-spool(5)``)."""

    def __init__(self, root: str):
        self.root = str(root)

    def __repr__(self) -> str:
        return f"SpoolStorage({self.root!r})"


class Queue:
    def __init__(self, storage: SpoolStorage, relay=None, cfg: config.Config | None = None):
        self.storage, self.relay = storage, relay
        self.cfg = copy.deepcopy(cfg) if cfg is not None else config.Config()
        self.cfg.spool.root = storage.root
        self.cfg.policies.stages = []
        self.policies: list[tuple[str, Policy]] = []
        self._spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher = None
        self._runner = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- Step 3: policies --------------------------------------------------

    def add_policy(self, policy: Policy) -> None:
        if self._spool is not None:
            raise RuntimeError("add policies before the queue's spool is used")
        names = {name for name, _ in self.policies}
        name, n = policy.stage, 2
        while name in names:
            name, n = f"{policy.stage}{n}", n + 1
        check_stage(name, [policy])
        self.policies.append((name, policy))
        self.cfg.policies.stages = [name for name, _ in self.policies]

    def pipeline(self) -> list[tuple[str, list[Policy]]]:
        return [(f"policy-{name}", [policy]) for name, policy in self.policies]

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(self.cfg.spool.root, self.cfg.stages(), modes=MODES,
                                claim_files=UNTRUSTED_STAGES, sync=self.cfg.spool.sync)
        return self._spool

    # -- running -----------------------------------------------------------

    def _components(self):
        from msa.cleanup.watcher import Watcher
        watcher = Watcher(self.cfg, self.spool, pipeline=self.pipeline())
        runner = None
        if self.relay is not None:
            from msa.delivery.runner import Runner
            kw = {}
            if "relay" in inspect.signature(Runner).parameters:
                kw["relay"] = self.relay
            runner = Runner(self.cfg, self.spool, **kw)
        return watcher, runner

    def start(self) -> None:
        """Run the watcher and the runner in a background thread; returns
        once they are running (raises what stopped them from starting)."""
        if self._thread is not None:
            return
        self.spool.recover()
        self._watcher, self._runner = self._components()
        self._thread = threading.Thread(target=self._run, name="msa-queue", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by start() or logged
            self._error = exc
            log.exception("queue stopped")
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._watcher.run())]
        if self._runner is not None:
            tasks.append(asyncio.create_task(self._runner.run()))
        self._ready.set()
        await asyncio.gather(*tasks)

    def flush(self) -> None:
        if self._runner is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._runner.flush)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the watcher and the runner; in-flight work finishes first."""
        if self._thread is None or self._loop is None:
            return

        async def _stop():
            self._watcher.stop()
            if self._runner is not None:
                await self._runner.stop()

        if not self._loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(_stop(), self._loop)
            try:
                fut.result(timeout)
            except Exception:
                log.exception("stopping the queue")
        self._thread.join(timeout)
        self._thread = None
