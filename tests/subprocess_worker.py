"""A worker process for tests that kill it (``python -m tests.subprocess_worker``): the
journeys' and campaigns' workflows and activities on the task queue the environment
names, without the schedule set-up and inbox drain of ``worker.main``."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from settings import Settings
from worker import build_worker


async def main() -> None:
    settings = Settings()
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    async with build_worker(client, settings):
        print("worker ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
