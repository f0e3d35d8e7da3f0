"""Events from the engine thread to the request handlers on the asyncio loop, batched.

The engine emits a few events per request per step; waking the loop for each (``call_soon_threadsafe`` writes to
the loop's self-pipe: a syscall, and a wake-up that takes the GIL from the engine) cost as much as a decode step of
a small model. A ``Post`` wakes its loop at most once until that wake-up has run, however many events and requests
it carries, and a ``Mailbox`` hands its handler every event pending at once, so a handler that fell behind answers
them in one write.
"""

import asyncio
import threading


class Post:
    """Delivers to the mailboxes of one event loop; ``put`` is called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self._due: set[Mailbox] = set()  # mailboxes with events their handler was not told of yet
        self._scheduled = False  # a wake-up is on its way to the loop

    def mailbox(self) -> "Mailbox":
        return Mailbox(self)

    def put(self, box: "Mailbox", event: dict) -> None:
        with self.lock:
            box.items.append(event)
            self._due.add(box)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # on the loop
        with self.lock:
            due, self._due, self._scheduled = self._due, set(), False
        for box in due:
            box.ready.set()


class Mailbox:
    """One request's events, in order. ``put`` (a ``Request.emit``) from the engine thread; ``take`` on the loop."""

    def __init__(self, post: Post) -> None:
        self.post = post
        self.items: list[dict] = []
        self.ready = asyncio.Event()

    def put(self, event: dict) -> None:
        self.post.put(self, event)

    async def take(self) -> list[dict]:
        """Every event pending, oldest first (at least one: waits for it)."""
        while True:
            with self.post.lock:
                items, self.items = self.items, []
                if not items:
                    self.ready.clear()
            if items:
                return items
            await self.ready.wait()
