"""The engine-to-loop hand-off: every event arrives, in order, and a burst of them wakes the loop once."""

import asyncio
import threading

from finetune.serving.handoff import Post


def test_a_burst_of_events_for_several_requests_wakes_the_loop_once_and_arrives_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        post, wakes = Post(loop), []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
        boxes = [post.mailbox() for _ in range(3)]

        def engine():  # one step's events for three requests, then a second step's
            for step in range(2):
                for i, box in enumerate(boxes):
                    box.put({"text": f"{i}.{step}"})

        t = threading.Thread(target=engine)
        t.start()
        t.join()  # the loop is blocked meanwhile: nothing was delivered yet
        got = [await box.take() for box in boxes]
        assert got == [[{"text": f"{i}.0"}, {"text": f"{i}.1"}] for i in range(3)]
        assert len(wakes) == 1
        await asyncio.sleep(0)  # the wake-up runs
        boxes[1].put({"finish_reason": "stop"})  # once it has, the next event wakes the loop again
        assert await asyncio.wait_for(boxes[1].take(), 5) == [{"finish_reason": "stop"}]
        assert len(wakes) == 2

    asyncio.run(main())
