"""The baseline's worker process: the minimal hand-written workflow and its one activity,
tuned like the Nurture worker (same settings, bytecode warmed the same way), polling its own
task queue.

Usage: ``python -m bench.baseline_worker <temporal address> <task queue>``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from temporalio.client import Client
from temporalio.worker import Worker

from bench.minimal import MinimalJourneyWorkflow, minimal_act
from settings import Settings
from worker import warm_bytecode


async def main(address: str, task_queue: str) -> None:
    settings = Settings()
    warm_bytecode()  # as the Nurture worker does: the sandbox re-imports per run
    client = await Client.connect(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[MinimalJourneyWorkflow],
        activities=[minimal_act],
        max_cached_workflows=settings.worker_max_cached_workflows,
        max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        max_concurrent_workflow_task_polls=settings.worker_workflow_task_pollers,
        max_concurrent_activity_task_polls=settings.worker_activity_task_pollers,
    ):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
