"""The scheduled audience refresh as an activity (see ``workflows/audience_refresh.py``)."""

from __future__ import annotations

from temporalio import activity

from activities.delivery import dispatch_contact_changes
from models.contracts import RefreshAudienceInput, RefreshAudienceResult
from models.db import session_scope
from settings import Settings


class AudienceActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="refresh_audience")
    async def refresh_audience(self, input: RefreshAudienceInput) -> RefreshAudienceResult:
        """Recompute every contact's score, stage and segments; deliver what that derives.

        Safe to repeat: membership changes are derived once (INSERT ... ON CONFLICT /
        DELETE ... RETURNING), so a retry after a crash only finishes the work."""
        async with session_scope(self.settings.database_url) as session:
            changes = await dispatch_contact_changes(
                session, activity.client(), self.settings, None
            )
        return RefreshAudienceResult(
            scores_changed=changes.scores_changed,
            stages_advanced=changes.stages_advanced,
            segments_entered=changes.segments_entered,
            segments_exited=changes.segments_exited,
            events_delivered=len(changes.derived_events),
        )
