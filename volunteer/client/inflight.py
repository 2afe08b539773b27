"""``InFlight``: several calls to one expert outstanding at once, bounded.

Over a home link one forward+backward of a micro-batch takes at least two round trips
(80 ms at 40 ms RTT) while the volunteer computes it in a few: with one call at a time the
volunteer idles and the link stays mostly empty. ``InFlight`` keeps up to ``max_in_flight``
calls to one expert running on its own small thread pool (``max_in_flight`` threads; the
transport gives each concurrent call its own connection), so the link and the volunteer
stay busy while the trainer waits on the oldest call only.

Bounded by construction: submitting blocks while ``max_in_flight`` calls are outstanding
(back-pressure on the trainer, no unbounded queue anywhere), and every call ends within
its deadline (the expert's own timeout), so a blocked submit always resumes.

Autograd semantics:

- ``forward(*inputs)`` runs ``expert(*inputs)`` on a pool thread in the caller's grad mode
  and returns a ``Future`` of the output, which carries the same graph as a direct call:
  ``out.backward(...)`` (or a loss built on it) works as usual, and so does
  ``backward(out, grad)``, which runs that backward on a pool thread so that several
  remote backward calls overlap too;
- ``step(*inputs, loss_fn=...)`` runs forward, ``loss_fn(output)`` and the backward of the
  loss in one slot and returns the detached loss: one micro-batch's whole training step.
  Gradients of the caller's own parameters (a local model before the expert) accumulate
  in ``.grad`` as with sequential steps (torch serialises each accumulation); the order of
  the float additions may differ, as with any concurrent backward.

``steps(batches, loss_fn)`` runs a whole sequence that way and yields the losses in order.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["InFlight"]

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _forward(expert: nn.Module, grad_enabled: bool, inputs: Sequence[torch.Tensor]):
    with torch.set_grad_enabled(grad_enabled):  # grad mode is per thread: take the caller's
        return expert(*inputs)


def _backward(outputs: Any, grad_outputs: Any) -> None:
    torch.autograd.backward(outputs, grad_outputs)


def _step(expert: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
    with torch.enable_grad():
        loss = loss_fn(expert(*inputs))
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
    return loss.detach()


class InFlight:
    """Up to ``max_in_flight`` outstanding calls to ``expert`` (e.g. a ``RemoteExpert``).

    Use as a context manager or call ``close()``; thread-safe.
    """

    def __init__(self, expert: nn.Module, max_in_flight: int = 4) -> None:
        if not 1 <= int(max_in_flight) <= 1024:
            raise ValueError(f"max_in_flight must be in [1, 1024], got {max_in_flight}")
        self.expert = expert
        self.max_in_flight = int(max_in_flight)
        self._slots = threading.Semaphore(self.max_in_flight)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._closed = False
        self._pool = cf.ThreadPoolExecutor(
            self.max_in_flight, thread_name_prefix="volunteer-inflight"
        )

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        """Calls submitted and not finished yet (at most ``max_in_flight``)."""
        with self._lock:
            return self._outstanding

    def _done(self, _future: cf.Future) -> None:
        with self._lock:
            self._outstanding -= 1
        self._slots.release()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        if self._closed:
            raise RuntimeError("InFlight is closed")
        self._slots.acquire()  # blocks while max_in_flight calls run; each ends by its deadline
        with self._lock:
            if self._closed:
                self._slots.release()
                raise RuntimeError("InFlight is closed")
            self._outstanding += 1
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._done(cf.Future())
            raise
        future.add_done_callback(self._done)
        return future

    def forward(self, *inputs: torch.Tensor) -> cf.Future:
        """``expert(*inputs)`` on a pool thread, in the caller's grad mode; a Future of the
        output (with its autograd graph). Blocks while ``max_in_flight`` calls run."""
        return self._submit(_forward, self.expert, torch.is_grad_enabled(), inputs)

    def backward(self, outputs: Any, grad_outputs: Any = None) -> cf.Future:
        """``torch.autograd.backward(outputs, grad_outputs)`` on a pool thread (the remote
        backward of outputs from ``forward``); a Future of None."""
        return self._submit(_backward, outputs, grad_outputs)

    def step(self, *inputs: torch.Tensor, loss_fn: LossFn) -> cf.Future:
        """Forward, ``loss_fn(output)`` (a scalar) and its backward in one slot; a Future of
        the detached loss. ``loss_fn`` runs on a pool thread."""
        return self._submit(_step, self.expert, inputs, loss_fn)

    def steps(
        self, batches: Iterable[Sequence[torch.Tensor]], loss_fn: LossFn
    ) -> Iterator[torch.Tensor]:
        """``step`` for each batch (a sequence of input tensors), ``max_in_flight`` at a
        time; yields the losses in batch order. A failed step raises when its turn comes
        (the steps already submitted still finish in the background)."""
        window: deque[cf.Future] = deque()
        for inputs in batches:
            if len(window) >= self.max_in_flight:
                yield window.popleft().result()
            window.append(self.step(*inputs, loss_fn=loss_fn))
        while window:
            yield window.popleft().result()

    def drain(self) -> None:
        """Wait until no call is outstanding (results stay in their futures)."""
        for _ in range(self.max_in_flight):
            self._slots.acquire()
        for _ in range(self.max_in_flight):
            self._slots.release()

    def close(self) -> None:
        """Refuse new calls and wait for the outstanding ones (each ends by its deadline)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
