"""The bridge between the engine, stepped in the main thread, and the server's asyncio requests in another."""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch.distributed as dist

from llama.engine import Engine, Request, SamplingParams

log = logging.getLogger("llama.serve")
# How often an idle first process under torchrun checks that the others still run (engine.ping): a stopped one is
# noticed within this time even when no request comes, well inside torchrun's 30 s between SIGTERM and SIGKILL.
PING_SECONDS = 5.0


class QueueFull(Exception):
    """More sequences than the engine's slots plus the waiting queue allow."""


class Stopping(Exception):
    """The server is shutting down and takes no new work."""


class EngineFailed(Exception):
    """The engine raised while stepping; the request cannot be completed."""


class PeerLost(RuntimeError):
    """Under torchrun, a step failed (another process stopped, or this one failed midway): the processes no longer
    compute together, and the server cannot continue."""


class Batch:
    """The sequences of one request (one per prompt), whose progress arrives on the event loop."""

    def __init__(self, runner: "EngineRunner", loop: asyncio.AbstractEventLoop):
        self.runner, self.loop = runner, loop
        self.submitted_at = time.monotonic()  # what latencies are measured from
        self.sequences: list[Request] = []
        self._released: set[int] = set()  # sequences whose reservation was given back (engine thread only)
        self._updates: asyncio.Queue[tuple[int, int, str | None]] = asyncio.Queue()

    def on_update(self, index: int, sequence: Request) -> None:
        """Called from the engine's thread: hand (index, tokens so far, finish_reason) to the event loop.

        Only a count is handed over: the lists only grow, so the tokens and logprobs up to it can be read from
        the loop's side while the engine appends more.
        """
        update = (index, len(sequence.tokens), sequence.finish_reason)
        if self.runner.observe is not None:
            self.runner.observe(sequence, self.submitted_at)
        if sequence.finished and index not in self._released:  # once, however often an engine reports the end
            self._released.add(index)
            self.runner.release(1)
        try:
            self.loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the loop is closed: the server is gone, and nobody waits for this any more
            pass

    def fail(self) -> None:
        """Called from the engine's thread when stepping raised: every waiting request ends with an error."""
        try:
            self.loop.call_soon_threadsafe(self._updates.put_nowait, (-1, 0, "error"))
        except RuntimeError:
            pass

    async def updates(self) -> AsyncIterator[tuple[int, int, str | None]]:
        """(index, number of tokens generated, finish_reason or None) until every sequence finished."""
        running = set(range(len(self.sequences)))  # each ends with an update carrying its finish_reason
        while running:
            index, n_tokens, reason = await self._updates.get()
            if index < 0:
                raise EngineFailed("the engine failed while generating; see the server's log")
            if index not in running:  # a late report about a sequence that already ended
                continue
            if reason is not None:
                running.discard(index)
            yield index, n_tokens, reason

    def cancel(self, index: int | None = None) -> None:
        """Stop generating sequence `index` (None: all of them); the engine frees their slots."""
        for i, sequence in enumerate(self.sequences):
            if (index is None or i == index) and not sequence.finished:
                self.runner.engine.cancel(sequence)
        self.runner.wake()


class EngineRunner:
    """Steps the engine in the thread that calls `run()` while it has work, and sleeps on a condition otherwise.

    That thread should be the one that loaded the model, with the HTTP server in another: OpenMP keeps a team of
    workers for every thread that runs parallel work, and with two teams alive on a machine with fewer spare cores
    its workers stop spinning between operations, and every decode step waits for them to wake (README's serve
    benchmark has the cost).
    """

    def __init__(self, engine: Engine, capacity: int, observe: Callable[[Request, float], None] | None = None):
        self.engine, self.capacity = engine, capacity  # capacity: sequences running and waiting, at most
        self.observe = observe  # called in the engine's thread with each sequence reported and its submission time
        self._condition = threading.Condition()
        self._pending = False  # new work since the engine's thread last looked
        self._stopping = False
        self._stopped = threading.Event()  # run() has returned
        self._outstanding = 0  # sequences submitted and not finished
        self._batches: set[Batch] = set()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Batch:
        """Queue one sequence per prompt, each with its params. Raises QueueFull, Stopping, or the engine's
        ValueError."""
        with self._condition:
            if self._stopping:
                raise Stopping("the server is shutting down")
            if self._outstanding + len(prompts) > self.capacity:
                raise QueueFull(f"the server is busy ({self._outstanding} sequences running or waiting, "
                                f"{self.capacity} at most); retry later")
            self._outstanding += len(prompts)  # reserved now, released as each sequence finishes
        batch = Batch(self, asyncio.get_running_loop())
        # Outside the condition's lock: the engine may call on_update (which takes it) while holding its own.
        try:
            for index, (prompt, sequence_params) in enumerate(zip(prompts, params, strict=True)):
                batch.sequences.append(self.engine.submit(
                    prompt, sequence_params, lambda sequence, i=index: batch.on_update(i, sequence)))
        except ValueError:
            batch.cancel()  # those already queued finish as cancelled, releasing their reservation
            self.release(len(prompts) - len(batch.sequences))
            raise
        with self._condition:
            self._batches.add(batch)
        self.wake()
        return batch

    def release(self, n: int) -> None:
        with self._condition:
            self._outstanding = max(0, self._outstanding - n)  # never below 0 after a failed engine's reset

    def wake(self) -> None:
        """There is new work (a cancellation, say) for the engine's thread."""
        with self._condition:
            self._pending = True
            self._condition.notify()

    def stop(self) -> None:
        """Take no new work, and wait until `run()` has let the running sequences finish and returned."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._stopped.wait()

    def run(self) -> None:
        """Step the engine until `stop()`, then release the other ranks (under torchrun). Raises PeerLost when,
        under torchrun, a step, an idle ping or the release fails: the ranks are then out of step for good."""
        try:
            self._step_until_stopped()
            self._together(self.engine.shutdown)
        finally:
            self._stopped.set()

    def _step_until_stopped(self) -> None:
        busy = False
        while True:
            with self._condition:
                while not (busy or self._pending or self._stopping):
                    if not self._condition.wait(PING_SECONDS):
                        break  # idle for PING_SECONDS: make sure the other processes are still there
                idle = not (busy or self._pending or self._stopping)
                if self._stopping and not busy and not self._pending:
                    return
                self._pending = False
                self._batches = {b for b in self._batches if not all(s.finished for s in b.sequences)}
            if idle:
                self._together(self.engine.ping)
                continue
            try:
                busy = self._together(self.engine.step)
            except PeerLost:
                raise
            except Exception:  # noqa: BLE001 - one failure must not wedge every later request
                log.exception("the engine failed while stepping")
                self._fail_all()
                busy = False

    def _together(self, work: Callable[[], bool | None]) -> bool | None:
        """`work()`; under torchrun any failure of it is PeerLost (after failing every waiting request): rank 0
        cannot tell how far the others got, and a collective with a stopped process fails (gloo: "Connection
        closed by peer")."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            return work()
        except Exception as error:
            if world == 1:
                raise
            with self._condition:
                self._stopping = True  # new requests get 503 rather than wait for steps that will not come
            self._fail_all()
            detail = str(error).split("] ", 1)[-1].split(". ", 1)[0]  # gloo's message, without its source line
            if "peer" not in detail:  # not a lost connection: a failure of this process, with its traceback
                log.exception("the engine failed while stepping under torchrun")
                raise PeerLost(f"the first process failed in a step ({detail}): the processes are out of step, "
                               "and the server cannot continue") from error
            who = "process 1 of 2" if world == 2 else f"one of processes 1 to {world - 1} (of {world})"
            raise PeerLost(f"{who} stopped or failed ({detail}); the server cannot continue") from error

    def _fail_all(self) -> None:
        with self._condition:
            batches, self._batches = self._batches, set()
            self._outstanding = 0
        for batch in batches:
            batch.fail()
