"""Nurture's benchmark suite: every figure beside a baseline measured in the same run on the
same server, with the ratio as the headline (the machine is shared and noisy).

- billable Temporal actions and history events per contact, each shipped journey against a
  minimal hand-written workflow on the same path (time-skipping server; deterministic);
- enrollment through the API against the raw client's start rate, and worker memory per
  active journey (dev server, worker and API in their own processes);
- event -> next action latency at a steady rate against raw signal -> activity;
- SendGrid batches of signed events through the webhook, end to end, against raw signals;
- segment count and listing on PostgreSQL (bench/segment_count.py).

Usage: ``python -m bench [--contacts 1100] [--segment-contacts 100000] [--skip segments]``.
Uses the PostgreSQL server ``DATABASE_URL`` names (scratch databases, dropped after), else an
embedded one. Writes bench/results/suite.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from bench import segment_count, throughput
from bench.actions import RunCost
from bench.scenarios import ACTIONS_TARGET, SCENARIOS, measure_pair
from bench.stack import BIN, running_stack, scratch_database
from devstack.temporal import register_search_attributes
from settings import Settings
from worker import build_worker

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "enrollment": ("ratio", ">=", 0.9),
    "ingestion": ("ratio", ">=", 0.8),
    "latency": ("p95_ratio", "<=", 1.5),
}


async def actions(database_url: str, data_dir: Path) -> dict[str, Any]:
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        api_key="bench",
        task_queue=f"bench-actions-{uuid.uuid4().hex[:6]}",
    )
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server")
    )
    rows: dict[str, Any] = {}
    try:
        await register_search_attributes(env.client)
        app = create_app(settings, temporal=env.client)
        async with (
            build_worker(env.client, settings),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://nurture.bench",
                headers={"Authorization": "Bearer bench"},
            ) as api,
        ):
            for scenario in SCENARIOS:
                nurture, minimal = await measure_pair(env, api, scenario)
                rows[scenario.name] = _cost_row(nurture, minimal)
    finally:
        await env.shutdown()
    return rows


def _cost_row(nurture: RunCost, minimal: RunCost) -> dict[str, Any]:
    return {
        "nurture_actions": nurture.actions,
        "minimal_actions": minimal.actions,
        "actions_ratio": round(nurture.actions / minimal.actions, 2),
        "nurture_events": nurture.events,
        "minimal_events": minimal.events,
        "events_ratio": round(nurture.events / minimal.events, 2),
        "nurture_by_kind": dict(nurture.by_kind),
    }


def say(what: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


async def live(database_url: str, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with running_stack(database_url, data_dir, args.api_workers) as stack:
        people = await throughput.prepare(stack, args.contacts)
        say(f"enrolling {len(people)} contacts (raw client first, then the API)")
        enrolled, nurture, baseline = await throughput.enrollment(stack, people, args.concurrency)
        emails = [email for _, email in people]
        timed, batched = emails[: args.latency_events], emails[args.latency_events :]
        say(f"latency: {len(timed)} events at {args.rate}/s")
        latency = await throughput.latency(stack, timed, nurture, baseline, args.rate)
        say(f"ingestion: {len(batched)} events in batches of {args.batch}")
        ingestion = await throughput.ingestion(
            stack, batched, nurture, baseline, args.batch, args.concurrency
        )
        # Last: its journeys would otherwise hear the events measured above too.
        say(f"bulk enrollment of the same {len(people)} contacts in a copy of the journey")
        bulk = await throughput.bulk_enrollment(stack, people, args.concurrency)
    return {
        "api_processes": args.api_workers,
        "enrollment": enrolled,
        "bulk_enrollment": bulk,
        "latency": latency,
        "ingestion": ingestion,
    }


def _met(figures: dict[str, Any], name: str) -> str:
    field, op, target = TARGETS[name]
    value = figures[field]
    ok = value >= target if op == ">=" else value <= target
    return f"{value:.2f} ({op} {target}: {'met' if ok else 'NOT met'})"


def print_report(report: dict[str, Any]) -> None:
    print(f"\nNurture benchmark, {report['machine']}, {report['finished_at']}\n")
    if "actions" in report:
        print(f"Billable Temporal actions per contact (target <= {ACTIONS_TARGET}x minimal):")
        header = ("journey/path", "nurture", "minimal", "ratio", "events", "ev ratio")
        print("{:<32}{:>9}{:>9}{:>7}{:>8}{:>9}".format(*header))
        for name, row in report["actions"].items():
            print(
                f"{name:<32}{row['nurture_actions']:>9}{row['minimal_actions']:>9}"
                f"{row['actions_ratio']:>7.2f}{row['nurture_events']:>8}{row['events_ratio']:>9.2f}"
            )
    if "enrollment" in report:
        e, lat, ing = report["enrollment"], report["latency"], report["ingestion"]
        print("\nLive (dev server; Nurture worker and API in their own processes):")
        print(f"{'figure':<36}{'nurture':>12}{'raw client':>12}   ratio")
        print(
            f"{'enrollment /s (single, API)':<36}{e['nurture_per_s']:>12}{e['raw_per_s']:>12}   "
            + _met(e, "enrollment")
        )
        b = report["bulk_enrollment"]
        print(
            f"{'enrollment /s (bulk, API)':<36}{b['nurture_per_s']:>12}{b['raw_per_s']:>12}   "
            + _met(b, "enrollment")
        )
        print(
            f"{'ingestion events/s (SendGrid)':<36}{ing['nurture_per_s']:>12}"
            f"{ing['raw_per_s']:>12}   " + _met(ing, "ingestion")
        )
        print(
            f"{'event -> action p50 ms':<36}{lat['nurture_p50_ms']:>12}{lat['raw_p50_ms']:>12}   "
            f"{lat['p50_ratio']:.2f}"
        )
        print(
            f"{'event -> action p95 ms':<36}{lat['nurture_p95_ms']:>12}{lat['raw_p95_ms']:>12}   "
            + _met(lat, "latency")
        )
        print(
            f"{'worker KiB per active journey':<36}{e['worker_kib_per_journey']:>12}"
            f"{e['baseline_kib_per_workflow']:>12}"
        )
        print_cpu(report)
    if "segments" in report:
        segment_count.print_table(report["segments"])


def print_cpu(report: dict[str, Any]) -> None:
    """Where each figure's CPU went: ms per contact or event, by process, until idle."""
    columns = [
        ("enroll", report["enrollment"]["cpu_ms_per_contact"]),
        ("bulk", report["bulk_enrollment"]["cpu_ms_per_contact"]),
        ("ingest", report["ingestion"]["cpu_ms_per_event"]),
    ]
    print("\nCPU ms per contact or event, by process (until every process is idle):")
    header = "".join(f"{f'{name} N':>10}{f'{name} raw':>11}" for name, _ in columns)
    print(f"{'process':<18}{header}")
    for process in columns[0][1]["nurture"]:
        cells = "".join(
            f"{figures['nurture'][process]:>10.2f}{figures['raw'][process]:>11.2f}"
            for _, figures in columns
        )
        print(f"{process:<18}{cells}")
    ratios = "".join(
        f"{figures['raw']['total'] / figures['nurture']['total']:>21.2f}" for _, figures in columns
    )
    print(f"{'raw / Nurture':<18}{ratios}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1100, help="contacts enrolled live")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--latency-events", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10, help="latency events per second")
    parser.add_argument("--batch", type=int, default=1000, help="SendGrid events per request")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (uvicorn)")
    parser.add_argument("--segment-contacts", type=int, default=100_000)
    parser.add_argument("--segment-runs", type=int, default=3)
    parser.add_argument(
        "--skip", action="append", default=[], choices=["actions", "live", "segments"]
    )
    args = parser.parse_args()
    started = time.monotonic()
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": "python -m bench",
    }
    with tempfile.TemporaryDirectory(prefix="nurture-bench-") as tmp:
        if "actions" not in args.skip:
            say("actions per contact, on the time-skipping server")
            async with scratch_database() as url:
                report["actions"] = await actions(url, Path(tmp) / "actions")
        if "live" not in args.skip:
            async with scratch_database() as url:
                report.update(await live(url, Path(tmp) / "live", args))
        if "segments" not in args.skip:
            say(f"segments: {args.segment_contacts} contacts")
            async with scratch_database() as url:
                report["segments"] = await segment_count.run(
                    url, args.segment_contacts, args.segment_runs
                )
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["seconds"] = round(time.monotonic() - started, 1)
    print_report(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "suite.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} in {report['seconds']} s")


if __name__ == "__main__":
    asyncio.run(main())
