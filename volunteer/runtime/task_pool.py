"""``Task`` (one validated request waiting for compute) and ``TaskPool`` (FIFO per
(expert uid, op)). Pools are plain deques guarded by the runtime's lock; the scheduler picks
the pool whose oldest task waited longest, so no pool starves while another is flooded.

``ReleasingReply`` ties a request's admitted bytes to its answer: the runtime reserves a
request's payload bytes (``payload_nbytes``) against ``max_queued_bytes`` on arrival and
gets them back when the reply is called, whether the task was computed, refused or cut.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ReplyFn = Callable[[list], None]


@dataclass(eq=False, slots=True)
class Task:
    """One forward or backward request of ``rows`` samples."""

    uid: str
    op: str
    request_id: int
    inputs: list[torch.Tensor]
    reply: ReplyFn
    deadline: float
    enqueued: float
    rows: int
    grad_outputs: list[torch.Tensor] = field(default_factory=list)
    will_backward: bool = False
    forward_id: int | None = None
    compression: str | None = None
    nbytes: int = 0
    cached: bool = False  # forward: its graph was stored (told to the client)
    replied: bool = False
    # per tensor of inputs + grad_outputs: the dtype the client had, where a 16-bit one was
    # left in its wire dtype (``decode_request(restore=False)``); empty: all as received
    restores: list[torch.dtype | None] = field(default_factory=list)

    def dtype_of(self, tensors: str, i: int) -> torch.dtype:
        """The client's dtype of ``inputs[i]`` ("inputs") or ``grad_outputs[i]`` ("grads")."""
        own = self.inputs if tensors == "inputs" else self.grad_outputs
        at = i if tensors == "inputs" else len(self.inputs) + i
        back = self.restores[at] if at < len(self.restores) else None
        return back or own[i].dtype

    def reply_dtype(self, i: int) -> torch.dtype:
        """The dtype the client expects reply tensor ``i`` in: a forward's output and a
        backward's input gradients take their input's dtype (the output gradient's when a
        backward omitted its inputs)."""
        if self.inputs:
            return self.dtype_of("inputs", min(i, len(self.inputs) - 1))
        return self.dtype_of("grads", 0)

    def reply_dtypes(self, n: int) -> list[torch.dtype]:
        """``reply_dtype`` of each of ``n`` reply tensors."""
        return [self.reply_dtype(i) for i in range(n)]


class TaskPool:
    """FIFO of tasks for one (uid, op); ``max_size`` bounds the number of waiting tasks."""

    def __init__(self, uid: str, op: str, max_size: int) -> None:
        self.uid = uid
        self.op = op
        self.max_size = max_size
        self.tasks: deque[Task] = deque()

    def __len__(self) -> int:
        return len(self.tasks)

    def full(self) -> bool:
        return len(self.tasks) >= self.max_size

    def take_batch(self, max_rows: int) -> list[Task]:
        """Pop tasks in FIFO order while their rows fit in ``max_rows`` (at least one task)."""
        batch: list[Task] = []
        rows = 0
        while self.tasks and (not batch or rows + self.tasks[0].rows <= max_rows):
            task = self.tasks.popleft()
            batch.append(task)
            rows += task.rows
        return batch


class ReleasingReply:
    """A reply callback that gives the request's bytes back (once) before answering."""

    __slots__ = ("nbytes", "release", "reply")

    def __init__(self, reply: ReplyFn, release: Callable[[int], None], nbytes: int) -> None:
        self.reply = reply
        self.release = release
        self.nbytes = nbytes

    def __call__(self, frames: list) -> None:
        n, self.nbytes = self.nbytes, 0
        if n:
            self.release(n)
        self.reply(frames)


def payload_nbytes(frames: list) -> int:
    """Bytes of the frames after the header (the tensors a request carries)."""
    return sum(f.nbytes if type(f) is memoryview else len(f) for f in frames[1:])
