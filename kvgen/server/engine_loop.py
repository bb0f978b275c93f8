"""The engine on a thread of its own, so the event loop never waits for the model.

The engine is not thread-safe, so this one thread makes every call into it: HTTP handlers
queue commands (add a request, abort one), and each turn of the loop runs the queued commands,
then one engine step. Outputs go back to each request's asyncio queue on its event loop. With
nothing to do, the thread sleeps on an event instead of spinning.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import defaultdict

from ..engine import Engine, EngineStats, RequestOutput

log = logging.getLogger(__name__)


class EngineFailed(Exception):
    """Put on a request's queue when an engine step raised: the request cannot go on."""


class EngineLoop:
    """Runs an Engine's steps, and every other call into it, on one background thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats: EngineStats = engine.stats()  # refreshed by the thread after each turn
        self.failed: BaseException | None = None  # set when the thread could not go on
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False  # set once the thread takes no more commands
        # request id -> (event loop, asyncio.Queue); touched by the engine thread only.
        self._sinks: dict[object, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="kvgen-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        """Abort every request and end the thread, waiting at most timeout seconds."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    async def add(self, requests: list[tuple[object, list[int], dict]], sink: asyncio.Queue):
        """Return once the engine has taken all of requests, (request id, prompt ids,
        add_request keywords), or none of them: raise what add_request raised.

        Their RequestOutputs (or an EngineFailed) arrive on sink, each request's last finished.
        """
        if not self.alive:
            raise EngineFailed(f"the engine is not running ({self.failed or 'stopped'})")
        loop = asyncio.get_running_loop()

        def add():
            added = []
            try:
                for request_id, prompt_ids, options in requests:
                    self.engine.add_request(prompt_ids, request_id=request_id, **options)
                    added.append(request_id)
            except Exception:
                for request_id in added:
                    self.engine.abort(request_id)
                raise
            for request_id in added:
                self._sinks[request_id] = (loop, sink)

        done = concurrent.futures.Future()
        self._submit(add, done)
        await asyncio.wrap_future(done)

    def abort(self, request_id):
        """Drop a request and free its blocks at the thread's next turn (no-op if finished)."""
        def abort():
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

        self._submit(abort, None)

    def _submit(self, command, done):
        self._commands.put((command, done))
        self._wake.set()
        if self._closed:  # the thread has gone: answer for it
            self._refuse_commands()

    def _run(self):
        try:
            while not self._stopping:
                self._wake.clear()  # before draining: a command queued after this wakes us
                self._run_commands()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self.stats = self.engine.stats()
                    self._wake.wait()
        except BaseException as e:  # the engine is in an unknown state: refuse new work
            log.exception("engine thread stopped")
            self.failed = e
        self._shutdown()

    def _run_commands(self):
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done is not None and not done.set_running_or_notify_cancel():
                continue  # its caller was cancelled before it ran: do nothing
            try:
                result = command()
            except Exception as e:
                if done is None:
                    raise
                done.set_exception(e)
            else:
                if done is not None:
                    done.set_result(result)

    def _step(self):
        try:
            outputs = self.engine.step()
        except Exception as e:
            # One bad step fails the requests in flight, not the server: they are aborted, so
            # the engine holds nothing of them, and later requests start clean.
            log.exception("engine step failed; failing %d requests", len(self._sinks))
            self._fail_all(EngineFailed(f"engine step failed: {e}"))
            return
        # Stats first: a client that has its last token sees metrics that count it finished.
        self.stats = self.engine.stats()
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]):
        batches = defaultdict(list)  # one wake-up per event loop per step, not per output
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:  # aborted meanwhile
                continue
            if out.finished:
                del self._sinks[out.request_id]
            batches[sink[0]].append((sink[1], out))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, error: Exception):
        sinks, self._sinks = self._sinks, {}
        for request_id, (loop, sink) in sinks.items():
            self.engine.abort(request_id)
            _call_soon(loop, sink.put_nowait, error)

    def _shutdown(self):
        self._closed = True
        self._refuse_commands()
        error = EngineFailed("the server is shutting down" if self.failed is None
                             else f"the engine stopped: {self.failed}")
        try:
            self._fail_all(error)
        except Exception:
            log.exception("aborting requests at shutdown")
        self.stats = self.engine.stats()

    def _refuse_commands(self):
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done is not None and done.set_running_or_notify_cancel():
                done.set_exception(EngineFailed("the server is shutting down"))


def _put_all(items):
    for sink, out in items:
        sink.put_nowait(out)


def _call_soon(loop, callback, *args):
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass
