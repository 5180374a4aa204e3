"""The marketer's dashboard: server-rendered pages (Jinja2) with charts (Chart.js, vendored
in api/static) and the journey graph (server-side SVG, api/journey_graph.py).

Login is an API key with the read scope, exchanged for a signed session cookie (HMAC,
HttpOnly, SameSite=Lax, expiring) that names the key: any API replica accepts it, and
each page checks the key is still live, so revoking it ends its sessions at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.analytics import (
    EnrollmentFilter,
    MessageFilter,
    breakdown,
    enrollment_metrics,
    enrollment_summary,
    journey_funnel,
    journey_report,
    message_metrics,
    message_summary,
    segment_sizes,
)
from api.deps import SessionDep, SettingsDep
from api.journey_graph import journey_svg
from api.keys import ApiKeyPrincipal, Scope, authenticate_key
from api.tokens import tracking_key, verify_url
from models.journey import JourneyDocument, parse_journey
from models.tables import (
    ApiKey,
    Contact,
    Enrollment,
    Event,
    Journey,
    JourneyVersion,
    Message,
    Segment,
    SegmentMember,
)
from settings import Settings

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
COOKIE = "nurture_dashboard"
MAX_KEY_LENGTH = 512

router = APIRouter(prefix="/dashboard", include_in_schema=False)


async def dashboard_key_ok(
    session: AsyncSession, settings: Settings, raw_key: str
) -> ApiKeyPrincipal | None:
    """The key's principal if ``raw_key`` may open the dashboard: a live key with the
    ``read`` scope (the bootstrap ``NURTURE_API_KEY`` is an admin key)."""
    principal = await authenticate_key(session, settings, raw_key)
    if principal is None or not principal.allows(Scope.read):
        return None
    return principal


def _session_secret(settings: Settings) -> bytes:
    if settings.dashboard_secret:
        return settings.dashboard_secret.encode()
    # Derived from the API key: a new key ends every session made with the old one.
    return hmac.new(
        (settings.api_key or "").encode(), b"nurture-dashboard-session", hashlib.sha256
    ).digest()


def _mac(settings: Settings, payload: str) -> str:
    digest = hmac.new(_session_secret(settings), payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


BOOTSTRAP_KID = "-"


def make_session(
    settings: Settings, key_id: uuid.UUID | None = None, now: float | None = None
) -> str:
    """A signed cookie naming the key that logged in (``-``: the bootstrap key), so a
    revoked key's sessions end with it."""
    expires = int((now or time.time()) + settings.dashboard_session_hours * 3600)
    kid = key_id.hex if key_id else BOOTSTRAP_KID
    payload = f"v1.{expires}.{kid}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_mac(settings, payload)}"


def session_key(settings: Settings, cookie: str | None, now: float | None = None) -> str | None:
    """The key id a cookie was made for, if its signature holds and it has not expired."""
    if not cookie or not (settings.api_key or settings.dashboard_secret):
        return None
    payload, _, mac = cookie.rpartition(".")
    parts = payload.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
        return None
    if not secrets.compare_digest(mac.encode(), _mac(settings, payload).encode()):
        return None
    if int(parts[1]) <= (now or time.time()):
        return None
    return parts[2]


def session_ok(settings: Settings, cookie: str | None, now: float | None = None) -> bool:
    return session_key(settings, cookie, now) is not None


async def _key_live(session: AsyncSession, settings: Settings, kid: str) -> bool:
    """The session's key still exists, unrevoked, with the read scope (one indexed read per
    page: revocation ends dashboard sessions at once, in every replica)."""
    if kid == BOOTSTRAP_KID:
        return bool(settings.api_key)
    try:
        key_id = uuid.UUID(hex=kid)
    except ValueError:
        return False
    row = await session.get(ApiKey, key_id)
    return (
        row is not None
        and row.revoked_at is None
        and bool({Scope.read.value, Scope.admin.value} & set(row.scopes))
    )


def _safe_next(value: str | None) -> str:
    """Only a path inside the dashboard: never an open redirect."""
    if value and value.startswith("/dashboard") and not urlsplit(value).netloc:
        return value
    return "/dashboard"


async def require_login(request: Request, settings: SettingsDep, session: SessionDep) -> None:
    kid = session_key(settings, request.cookies.get(COOKIE))
    if kid is None or not await _key_live(session, settings, kid):
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        raise HTTPException(
            status.HTTP_303_SEE_OTHER,
            "log in first",
            headers={"Location": f"/dashboard/login?next={target}"},
        )


LoggedIn = Annotated[None, Depends(require_login)]


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _page(request, "dashboard/login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    body = await request.body()
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    key = form.get("api_key", "").strip()
    target = _safe_next(form.get("next"))
    principal = (
        await dashboard_key_ok(session, settings, key)
        if key and len(key) <= MAX_KEY_LENGTH
        else None
    )
    if principal is None:
        error = "api_key: enter the API key" if not key else "api_key: that key is not valid"
        return _page(
            request, "dashboard/login.html", status.HTTP_401_UNAUTHORIZED, next=target, error=error
        )
    response = RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE,
        make_session(settings, principal.id),
        max_age=settings.dashboard_session_hours * 3600,
        httponly=True,
        samesite="lax",
        secure=settings.public_url.startswith("https://"),
        path="/dashboard",
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/dashboard/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="lax")
    return response


NONE = "\u2013"  # an en dash stands for "no value"


def _pct(value: float | None) -> str:
    return NONE if value is None else f"{value * 100:.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


templates.env.filters["pct"] = _pct
templates.env.filters["duration"] = _duration


@router.get("", response_class=HTMLResponse)
async def journeys_page(request: Request, session: SessionDep, _: LoggedIn) -> HTMLResponse:
    journeys = (await session.exec(select(Journey).order_by(Journey.key))).all()
    enrollments = breakdown(
        await enrollment_metrics(session, EnrollmentFilter(), ("journey",)), "journey"
    )
    messages = breakdown(await message_metrics(session, MessageFilter(), ("journey",)), "journey")
    by_journey_e = {r.key["journey"]: r for r in enrollments}
    by_journey_m = {r.key["journey"]: r for r in messages}
    rows = [
        {
            "journey": j,
            "enrollments": enrollment_summary(by_journey_e.get(j.id)),
            "messages": message_summary(by_journey_m.get(j.id)),
        }
        for j in journeys
    ]
    return _page(request, "dashboard/journeys.html", rows=rows, nav="journeys")


async def _document(
    session: SessionDep, journey: Journey, version: int | None
) -> tuple[JourneyDocument | None, int | None]:
    query = select(JourneyVersion).where(JourneyVersion.journey_id == journey.id)
    if version is not None:
        query = query.where(JourneyVersion.version == version)
    else:
        query = query.order_by(col(JourneyVersion.version).desc())
    row = (await session.exec(query.limit(1))).first()
    if row is None:
        if version is not None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"version: journey {journey.key!r} has no version"
            )
        try:
            return parse_journey(journey.draft), None
        except ValueError:
            return None, None
    return parse_journey(row.document), row.version


def _step_lines(document: JourneyDocument, report: dict[str, Any]) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for entry in report["by_step"]:
        m = entry["messages"]
        lines[entry["step"]] = [
            f"sent {m['sent']} · delivered {m['delivered']}",
            f"opened {_pct(m['open_rate'])} · clicked {_pct(m['click_rate'])}",
        ]
    variants = {v["variant"]: v["enrollments"]["enrolled"] for v in report["by_variant"]}
    for step in document.steps:
        if step.type == "split":
            names = [v.variant for v in step.variants]
            lines[step.id] = [" · ".join(f"{n}: {variants.get(n, 0)}" for n in names)]
        elif step.type == "exit":
            lines[step.id] = [f"completed {report['enrollments']['completed']}"]
    return lines


@router.get("/journeys/{key}", response_class=HTMLResponse)
async def journey_page(
    request: Request,
    key: str,
    session: SessionDep,
    _: LoggedIn,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    journey = (await session.exec(select(Journey).where(Journey.key == key))).first()
    if journey is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no journey with key {key!r}")
    document, shown_version = await _document(session, journey, version)
    report = await journey_report(session, journey.id, version)
    got, opened, clicked = await journey_funnel(session, journey.id, version)
    e = report["enrollments"]
    funnel = {
        "labels": ["Enrolled", "Got a message", "Opened", "Clicked", "Converted"],
        "values": [e["enrolled"], got, opened, clicked, e["conversions"]],
    }
    graph = journey_svg(document, _step_lines(document, report)) if document else None
    if document is not None:  # steps in the document's order, then any of older versions
        order = {step.id: n for n, step in enumerate(document.steps)}
        report["by_step"].sort(key=lambda s: (order.get(s["step"], len(order)), s["step"]))
    versions = (
        await session.exec(
            select(JourneyVersion.version)
            .where(JourneyVersion.journey_id == journey.id)
            .order_by(col(JourneyVersion.version))
        )
    ).all()
    return _page(
        request,
        "dashboard/journey.html",
        nav="journeys",
        journey=journey,
        report=report,
        graph=graph,
        funnel_json=json.dumps(funnel),
        version=version,
        shown_version=shown_version,
        versions=list(versions),
    )


@router.get("/contacts", response_class=HTMLResponse)
async def contacts_page(
    request: Request,
    session: SessionDep,
    _: LoggedIn,
    q: Annotated[str | None, Query(max_length=320)] = None,
) -> HTMLResponse:
    query = select(Contact).where(col(Contact.erased_at).is_(None))
    if q:
        query = query.where(col(Contact.email).startswith(q.strip().lower(), autoescape=True))
    contacts = (await session.exec(query.order_by(col(Contact.created_at).desc()).limit(50))).all()
    return _page(request, "dashboard/contacts.html", nav="contacts", contacts=contacts, q=q or "")


@router.get("/contacts/{contact_id}", response_class=HTMLResponse)
async def contact_page(
    request: Request,
    contact_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    _: LoggedIn,
) -> HTMLResponse:
    contact = await session.get(Contact, contact_id)
    if contact is None or contact.erased_at is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no contact with id {contact_id}")
    segments = (
        await session.exec(
            select(Segment)
            .join(SegmentMember, col(SegmentMember.segment_id) == Segment.id)
            .where(SegmentMember.contact_id == contact.id)
            .order_by(Segment.key)
        )
    ).all()
    events = (
        await session.exec(
            select(Event)
            .where(Event.contact_id == contact.id)
            .order_by(col(Event.occurred_at).desc())
            .limit(100)
        )
    ).all()
    messages = (
        await session.exec(
            select(Message)
            .where(Message.contact_id == contact.id)
            .order_by(col(Message.created_at).desc())
            .limit(100)
        )
    ).all()
    enrollment_rows = (
        await session.exec(
            select(Enrollment, Journey.key, JourneyVersion.version)
            .join(Journey, col(Journey.id) == Enrollment.journey_id)
            .join(JourneyVersion, col(JourneyVersion.id) == Enrollment.journey_version_id)
            .where(Enrollment.contact_id == contact.id)
            .order_by(col(Enrollment.started_at).desc())
        )
    ).all()
    base = f"{settings.temporal_ui_url.rstrip('/')}/namespaces/{settings.temporal_namespace}"
    enrollments = [
        {
            "enrollment": enrollment,
            "journey": journey_key,
            "version": journey_version,
            "temporal_url": f"{base}/workflows/{quote(enrollment.workflow_id, safe='')}"
            + (f"/{enrollment.run_id}" if enrollment.run_id else ""),
        }
        for enrollment, journey_key, journey_version in enrollment_rows
    ]
    return _page(
        request,
        "dashboard/contact.html",
        nav="contacts",
        contact=contact,
        segments=segments,
        events=events,
        messages=messages,
        enrollments=enrollments,
    )


@router.get("/outbox", response_class=HTMLResponse)
async def outbox_page(request: Request, session: SessionDep, _: LoggedIn) -> HTMLResponse:
    messages = (
        await session.exec(
            select(Message, Contact.email)
            .outerjoin(Contact, col(Contact.id) == Message.contact_id)
            .where(Message.provider == "outbox")
            .order_by(col(Message.created_at).desc())
            .limit(200)
        )
    ).all()
    return _page(request, "dashboard/outbox.html", nav="outbox", messages=messages)


def _outbox_file(settings: Settings, message: Message) -> Path | None:
    if message.provider != "outbox" or not message.provider_message_id:
        return None
    folder = settings.outbox_path / ("email" if message.channel == "email" else "sms")
    name = Path(message.provider_message_id).name  # a file name, never a path
    path = folder / name
    return path if path.is_file() else None


_PIXEL = re.compile(r'<img src="[^"]*/t/o/[^"]*\.gif"[^>]*>')
_CLICK = re.compile(r'(["\'])(https?://[^"\']*/t/c/([^"\'/?#]+))\1')


def untracked(html: str, settings: Settings) -> str:
    """The email's HTML as the contact sees it, minus our tracking: viewing it here must
    not count as an open or a click. Tracked links point at their destination again."""
    key = tracking_key(settings)

    def original(match: re.Match[str]) -> str:
        verified = verify_url("click", match[3], key=key)
        url = verified[1] if verified else "#"
        return f"{match[1]}{url}{match[1]}"

    return _CLICK.sub(original, _PIXEL.sub("", html))


@router.get("/outbox/{message_id}", response_class=HTMLResponse)
async def outbox_message_page(
    request: Request,
    message_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    _: LoggedIn,
) -> HTMLResponse:
    message = await session.get(Message, message_id)
    if message is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no message with id {message_id}")
    path = _outbox_file(settings, message)
    email: dict[str, Any] | None = None
    sms: dict[str, Any] | None = None
    if path is not None and message.channel == "email":
        parsed = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        html_part = parsed.get_body(preferencelist=("html",))
        text_part = parsed.get_body(preferencelist=("plain",))
        html = html_part.get_content() if html_part is not None else None
        email = {
            "from": parsed["From"],
            "to": parsed["To"],
            "subject": parsed["Subject"],
            "date": parsed["Date"],
            "headers": [(k, v) for k, v in parsed.items() if k.startswith("List-")],
            "html": untracked(html, settings) if html else None,
            "text": text_part.get_content() if text_part is not None else None,
        }
    elif path is not None:
        sms = json.loads(path.read_text())
    return _page(
        request,
        "dashboard/outbox_message.html",
        nav="outbox",
        message=message,
        email=email,
        sms=sms,
    )


@router.get("/segments", response_class=HTMLResponse)
async def segments_page(request: Request, session: SessionDep, _: LoggedIn) -> HTMLResponse:
    segments = (await session.exec(select(Segment).order_by(Segment.key))).all()
    sizes: dict[uuid.UUID, int] = dict(
        (
            await (await session.connection()).execute(
                sa.text("SELECT segment_id, count(*) FROM segment_members GROUP BY segment_id")
            )
        ).all()
    )
    series = []
    for segment in segments:
        points = await segment_sizes(session, segment.id, limit=200)
        series.append(
            {
                "label": segment.key,
                "points": [{"x": t.isoformat(), "y": n} for t, n in points],
            }
        )
    rows = [{"segment": s, "size": sizes.get(s.id, 0)} for s in segments]
    return _page(
        request,
        "dashboard/segments.html",
        nav="segments",
        rows=rows,
        sizes_json=json.dumps(series),
    )
