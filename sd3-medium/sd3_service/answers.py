"""The request bookkeeping: answers by `request_id`, so a repeat gets the first answer without generating again."""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class AnswerBook:
    """Remembers the work for each request id: still running (a repeat waits for the same work) or done.

    Kept in this process's memory, bounded to `size` finished answers; a failed request is forgotten, so
    its id may be sent again.
    """

    def __init__(self, size: int = 1024):
        self.size = size
        self._answers: OrderedDict[str, asyncio.Future] = OrderedDict()

    def earlier(self, request_id: str) -> asyncio.Future | None:
        """The answer (or the work still running) for `request_id`, if this process has one."""
        return self._answers.get(request_id)

    def track(self, request_id: str, work: asyncio.Future) -> None:
        """Answer repeats of `request_id` with what `work` ends with."""
        answer = asyncio.get_running_loop().create_future()
        self._answers[request_id] = answer
        work.add_done_callback(lambda done: self._settle(request_id, answer, done))
        while len(self._answers) > self.size:
            oldest_id, oldest = next(iter(self._answers.items()))
            if not oldest.done():
                break
            del self._answers[oldest_id]

    def _settle(self, request_id: str, answer: asyncio.Future, work: asyncio.Future) -> None:
        if not work.cancelled() and work.exception() is None:
            answer.set_result(work.result().response)
            return
        self._answers.pop(request_id, None)
        if work.cancelled():  # the server is stopping
            answer.cancel()
            return
        answer.set_exception(work.exception())
        answer.exception()  # mark retrieved: the first caller gets the exception from the work itself
