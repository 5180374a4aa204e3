"""The soak at a small size (``python -m soak --minutes N`` runs it longer): contacts,
events and form webhooks at once while a worker is SIGKILLed, PostgreSQL and Temporal are
restarted and the provider storms; the books must balance. Prints them (``pytest -s``)."""

from __future__ import annotations

from pathlib import Path

from soak.run import SoakConfig, run_soak


async def test_soak_books_balance_under_faults(tmp_path: Path) -> None:
    report = await run_soak(
        SoakConfig(
            seconds=30, contacts=10, events_per_second=6, fault_every_seconds=4,
            work_dir=tmp_path / "soak",
        )
    )  # fmt: skip
    print("\n" + report.text())
    assert report.problems() == []
    assert set(report.fault_kinds) == {
        "SIGKILL a worker, start a new one",
        "restart PostgreSQL",
        "restart the Temporal dev server",
        "provider storm",
    }
    assert report.books is not None
    assert report.books.enrollments == 10
    assert report.books.messages == 20
    assert report.books.duplicates == {}
    assert len(report.accepted_events) == report.signalled_events > 0
