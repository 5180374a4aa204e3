"""The dashboard: login and its signed session cookie, and every page in headless Chromium
(Debian's, driven by Playwright) after an end-to-end journey on the time-skipping server:
real sends to the outbox, opens and clicks through the tracking endpoints, goal events.
The journey page's screenshot is docs/screenshots/journey.png (the README shows it)."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator
from email import policy
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from playwright.async_api import Page, async_playwright
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.dashboard import COOKIE, dashboard_key_ok, make_session, session_ok, untracked
from api.journey_graph import edges_of, journey_svg
from api.main import create_app
from api.tokens import sign, track_html, tracking_key
from models.db import session_scope
from models.journey import parse_journey
from models.tables import Enrollment, EnrollmentStatus, Message
from settings import Settings
from tests.helpers import EXAMPLES, contact, enroll, publish, put_template, unique, wait_for_step

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshots" / "journey.png"


@pytest.fixture
async def anonymous(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture.test"
    ) as client:
        yield client


async def test_dashboard_login_sets_a_signed_httponly_cookie(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    page = await anonymous.get("/dashboard/journeys/x?version=1")
    assert page.status_code == 303
    assert page.headers["location"] == "/dashboard/login?next=/dashboard/journeys/x%3Fversion%3D1"
    assert (await anonymous.get("/dashboard/login")).status_code == 200

    response = await anonymous.post(
        "/dashboard/login", data={"api_key": settings.api_key, "next": "/dashboard/segments"}
    )
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/segments"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=lax", "Path=/dashboard", "Max-Age=43200"):
        assert attribute.lower() in cookie.lower()
    assert (await anonymous.get("/dashboard/segments")).status_code == 200

    out = await anonymous.post("/dashboard/logout")
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert (await anonymous.get("/dashboard/segments")).status_code == 303


async def test_dashboard_login_refuses_bad_keys_and_offsite_redirects(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    wrong = await anonymous.post("/dashboard/login", data={"api_key": "nope"})
    assert wrong.status_code == 401 and "api_key: that key is not valid" in wrong.text
    assert "set-cookie" not in wrong.headers
    empty = await anonymous.post("/dashboard/login", data={})
    assert empty.status_code == 401 and "api_key: enter the API key" in empty.text
    huge = await anonymous.post("/dashboard/login", data={"api_key": "k" * 10_000})
    assert huge.status_code == 401
    offsite = await anonymous.post(
        "/dashboard/login", data={"api_key": settings.api_key, "next": "https://evil.test/x"}
    )
    assert offsite.status_code == 303 and offsite.headers["location"] == "/dashboard"
    scheme_relative = await anonymous.post(
        "/dashboard/login", data={"api_key": settings.api_key, "next": "//evil.test/dashboard"}
    )
    assert scheme_relative.headers["location"] == "/dashboard"


async def test_dashboard_session_is_signed_and_expires(settings: Settings) -> None:
    async with session_scope(settings.database_url) as session:
        assert await dashboard_key_ok(session, settings, "test-api-key")
        assert not await dashboard_key_ok(session, settings, "test-api-key ")
        unset = settings.model_copy(update={"api_key": None})
        assert not await dashboard_key_ok(session, unset, "")
    cookie = make_session(settings, now=1_000_000)
    assert session_ok(settings, cookie, now=1_000_000 + 3600)
    assert not session_ok(settings, cookie, now=1_000_000 + 12 * 3600 + 1)  # expired
    payload, _, mac = cookie.rpartition(".")
    version, expires, kid, nonce = payload.split(".")
    forged = f"{version}.{int(expires) + 10**6}.{kid}.{nonce}.{mac}"
    assert not session_ok(settings, forged, now=1_000_000)
    other_key = f"{version}.{expires}.{uuid.uuid4().hex}.{nonce}.{mac}"
    assert not session_ok(settings, other_key, now=1_000_000)
    assert not session_ok(settings, "garbage", now=1_000_000)
    # A new API key (or dashboard secret) ends every session.
    rotated = settings.model_copy(update={"api_key": "another-key"})
    assert not session_ok(rotated, cookie, now=1_000_000)
    secret = settings.model_copy(update={"dashboard_secret": "s3cret"})
    assert not session_ok(secret, cookie, now=1_000_000)
    assert session_ok(secret, make_session(secret, now=1_000_000), now=1_000_000)


async def test_dashboard_login_needs_a_live_read_key_and_revocation_ends_its_sessions(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    assert settings.api_key
    admin = {"X-API-Key": settings.api_key}
    keys = {}
    for scope in ("read", "write"):
        made = await anonymous.post(
            "/v1/api-keys",
            json={"name": unique(f"dash-{scope}"), "scopes": [scope]},
            headers=admin,
        )
        assert made.status_code == 201, made.text
        keys[scope] = made.json()
    refused = await anonymous.post("/dashboard/login", data={"api_key": keys["write"]["key"]})
    assert refused.status_code == 401 and "not valid" in refused.text
    assert COOKIE not in anonymous.cookies
    logged_in = await anonymous.post("/dashboard/login", data={"api_key": keys["read"]["key"]})
    assert logged_in.status_code == 303, logged_in.text
    assert (await anonymous.get("/dashboard")).status_code == 200
    revoked = await anonymous.post(f"/v1/api-keys/{keys['read']['id']}/revoke", headers=admin)
    assert revoked.status_code == 200, revoked.text
    after = await anonymous.get("/dashboard")
    assert after.status_code == 303 and after.headers["location"].startswith("/dashboard/login")


def test_outbox_view_strips_tracking_so_viewing_records_nothing(settings: Settings) -> None:
    key = tracking_key(settings)
    html = track_html(
        '<p><a href="https://example.com/pricing?a=1&amp;b=2">Pricing</a></p></body>',
        base_url=settings.public_url,
        message_id="m-1",
        key=key,
    )
    assert "/t/o/" in html and "/t/c/" in html
    shown = untracked(html, settings)
    assert "/t/o/" not in shown and "/t/c/" not in shown
    assert 'href="https://example.com/pricing?a=1&b=2"' in shown
    forged = f'<a href="{settings.public_url}/t/c/{sign("open", "m-1", key=key)}">x</a>'
    assert 'href="#"' in untracked(forged, settings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LINK_HTML = (
    "<html><body><h1>Hello {{ contact.first_name }}</h1>"
    '<p>See <a href="https://example.com/pricing">our pricing</a>.</p></body></html>'
)


async def _messages(settings: Settings, enrollment_id: str) -> list[Message]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Message)
            .where(col(Message.enrollment_id) == enrollment_id)
            .order_by(col(Message.created_at))
        )
        return list(rows.all())


async def _wait_exited(settings: Settings, enrollment_id: str) -> None:
    for _ in range(200):
        async with session_scope(settings.database_url) as session:
            enrollment = await session.get(Enrollment, enrollment_id)
            if enrollment is not None and enrollment.status != EnrollmentStatus.active:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"enrollment {enrollment_id} never ended")


async def _track(api: httpx.AsyncClient, settings: Settings, message: Message) -> None:
    """Open the email (pixel) and click its link, through the real tracking endpoints."""
    raw = (settings.outbox_path / "email" / f"{message.id}.eml").read_bytes()
    part = BytesParser(policy=policy.default).parsebytes(raw).get_body(("html",))
    assert part is not None
    html = str(part.get_content())
    base = re.escape(settings.public_url.rstrip("/"))
    [pixel] = re.findall(rf'<img src="{base}(/t/o/[^"]+\.gif)"', html)
    [click] = re.findall(rf'href="{base}(/t/c/[^"]+)"', html)
    assert (await api.get(pixel)).status_code == 200
    clicked = await api.get(click)
    assert clicked.status_code == 302 and clicked.headers["location"].startswith("https://example")


async def _login(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/dashboard")
    assert "/dashboard/login" in page.url
    await page.fill("input[name=api_key]", "wrong")
    await page.click("button[type=submit]")
    assert "not valid" in await page.inner_text(".error")
    await page.fill("input[name=api_key]", key)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/dashboard")


async def test_dashboard_pages_in_chromium_after_an_end_to_end_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    welcome, offer_a, offer_b = unique("welcome"), unique("offer-a"), unique("offer-b")
    for template, subject in (
        (welcome, "Welcome aboard, {{ contact.first_name }}"),
        (offer_a, "20% off your first year"),
        (offer_b, "A free month on us"),
    ):
        await put_template(time_api, template, subject=subject, html=LINK_HTML)
    key = unique("trial")
    await publish(
        time_api,
        {
            "key": key,
            "name": "Trial nurture",
            "exit_when": {"event": "purchase_completed"},
            "steps": [
                {"id": "welcome", "type": "email", "template": welcome},
                {
                    "id": "engaged",
                    "type": "wait_for",
                    "event": "email_clicked",
                    "timeout": "3d",
                    "on_event": "offer-split",
                    "on_timeout": "give-up",
                },
                {
                    "id": "offer-split",
                    "type": "split",
                    "variants": [
                        {"name": "a", "weight": 50, "goto": "offer-a"},
                        {"name": "b", "weight": 50, "goto": "offer-b"},
                    ],
                },
                {"id": "offer-a", "type": "email", "template": offer_a},
                {"id": "after-a", "type": "goto", "step": "decide"},
                {"id": "offer-b", "type": "email", "template": offer_b},
                {
                    "id": "decide",
                    "type": "wait_for",
                    "event": "purchase_completed",
                    "timeout": "7d",
                    "on_timeout": "give-up",
                },
                {"id": "give-up", "type": "exit"},
            ],
        },
    )
    people = [await contact(time_api, attributes={"first_name": f"P{n}"}) for n in range(6)]
    enrollments = [(await enroll(time_api, key, p["id"]))["enrollment"] for p in people]
    for enrollment in enrollments:
        await wait_for_step(time_api, enrollment["id"], "engaged")
    # Four open and click the welcome email, get an offer; two of them buy.
    for enrollment in enrollments[:4]:
        [message] = await _messages(settings, enrollment["id"])
        await _track(time_api, settings, message)
    for enrollment in enrollments[:4]:
        await wait_for_step(time_api, enrollment["id"], "decide")
    # The two buyers open and click their offer first.
    for enrollment in enrollments[:2]:
        _, offer = await _messages(settings, enrollment["id"])
        await _track(time_api, settings, offer)
    for n, (person, value) in enumerate(zip(people[:2], (120, 80), strict=True)):
        response = await time_api.post(
            "/v1/events",
            json={
                "id": unique("buy"),
                "contact_id": person["id"],
                "name": "purchase_completed",
                "properties": {"value": value, "order": f"o-{n}"},
            },
        )
        assert response.status_code in (200, 201, 202), response.text
    for enrollment in enrollments[:2]:
        await _wait_exited(settings, enrollment["id"])

    metrics = (await time_api.get(f"/v1/journeys/{key}/metrics")).json()
    assert metrics["enrollments"]["enrolled"] == 6 and metrics["enrollments"]["conversions"] == 2
    assert metrics["enrollments"]["revenue"] == 200.0
    assert metrics["messages"]["sent"] == 10  # 6 welcomes, 4 offers
    assert metrics["messages"]["clicked"] == 6 and metrics["messages"]["opened"] == 6
    [v1] = metrics["by_version"]  # each message carries its enrollment's version
    assert v1["version"] == 1 and v1["messages"]["sent"] == 10

    port = _free_port()
    app = create_app(settings, temporal=time_env.client)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # uvicorn has no start event to await
            if server.started:
                break
            await asyncio.sleep(0.05)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM)
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            await _login(page, base, str(settings.api_key))
            cookies = await page.context.cookies()
            [session] = [c for c in cookies if c["name"] == COOKIE]
            assert session["httpOnly"] and session["sameSite"] == "Lax"

            row = page.locator(f"tr[data-journey='{key}']")
            assert "Trial nurture" in await row.inner_text()

            await page.goto(f"{base}/dashboard/journeys/{key}")
            graph = page.locator("svg.journey-graph")
            await graph.wait_for()
            steps = await page.locator("svg.journey-graph g.step").evaluate_all(
                "nodes => nodes.map(n => n.dataset.step)"
            )
            assert steps == [
                "welcome", "engaged", "offer-split", "offer-a", "after-a", "offer-b", "decide",
                "give-up",
            ]  # fmt: skip
            assert await page.locator("svg.journey-graph path.edge").count() >= 8
            welcome_box = page.locator("svg.journey-graph g.step[data-step='welcome']")
            assert "sent 6" in (await welcome_box.text_content() or "")
            # The funnel is drawn by Chart.js on its canvas, with the journey's numbers.
            funnel = await page.evaluate(
                """() => {
                    const chart = Chart.getChart(document.getElementById('funnel-chart'));
                    if (!chart) return null;
                    const canvas = chart.canvas;
                    return {values: chart.data.datasets[0].data, width: canvas.width,
                            bars: chart.getDatasetMeta(0).data.length};
                }"""
            )
            assert funnel is not None, "the funnel chart is missing"
            assert funnel["values"] == [6, 6, 4, 4, 2] and funnel["bars"] == 5
            assert funnel["width"] > 100
            # The split is deterministic per enrollment, so which variants occur varies.
            shown = await page.locator("#variants tbody tr td:first-child").all_inner_texts()
            assert shown == [v["variant"] for v in metrics["by_variant"]] and shown
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 20_000

            buyer = people[0]
            await page.goto(f"{base}/dashboard/contacts?q={buyer['email'][:12]}")
            await page.click(f"text={buyer['email']}")
            assert await page.inner_text("#score") == "0"
            timeline = await page.inner_text("#events")
            assert "purchase_completed" in timeline and "email_clicked" in timeline
            temporal = page.locator("#enrollments a.temporal")
            href = await temporal.get_attribute("href")
            assert href is not None and href.startswith(
                f"{settings.temporal_ui_url}/namespaces/default/workflows/journey%2F{key}"
            )
            assert "20% off" in await page.inner_text("#messages") or "free month" in (
                await page.inner_text("#messages")
            )

            await page.goto(f"{base}/dashboard/outbox")
            await page.click("#outbox a >> text=Welcome aboard, P0")
            assert await page.inner_text("#subject") == "Welcome aboard, P0"
            frame = page.frame_locator("iframe.email-body")
            assert await frame.locator("h1").inner_text() == "Hello P0"
            link = await frame.locator("a").first.get_attribute("href")
            assert link == "https://example.com/pricing"  # tracking stripped for viewing

            await page.goto(f"{base}/dashboard/segments")
            drawn = await page.evaluate(
                "() => !!Chart.getChart(document.getElementById('segment-sizes-chart'))"
            )
            assert drawn, "the segment size chart is missing"

            await page.click("text=Log out")
            await page.goto(f"{base}/dashboard")
            assert "/dashboard/login" in page.url
            await browser.close()
    finally:
        server.should_exit = True
        await serving
    # Viewing the outbox recorded no open or click.
    after = (await time_api.get(f"/v1/journeys/{key}/metrics")).json()["messages"]
    assert after["opened"] == 6 and after["clicked"] == 6


async def test_dashboard_pages_answer_bad_input_with_a_clear_4xx(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    anonymous.cookies.set(COOKIE, make_session(settings), path="/dashboard")
    missing = await anonymous.get("/dashboard/journeys/no-such-journey")
    assert missing.status_code == 404 and "no-such-journey" in missing.text
    bad_version = await anonymous.get("/dashboard/journeys/x", params={"version": 0})
    assert bad_version.status_code == 422 and "version" in bad_version.text
    bad_id = await anonymous.get("/dashboard/contacts/not-a-uuid")
    assert bad_id.status_code == 422 and "contact_id" in bad_id.text
    nobody = await anonymous.get("/dashboard/contacts/00000000-0000-0000-0000-000000000000")
    assert nobody.status_code == 404
    no_message = await anonymous.get("/dashboard/outbox/00000000-0000-0000-0000-000000000000")
    assert no_message.status_code == 404 and "no message" in no_message.text
    for path in ("/dashboard", "/dashboard/contacts", "/dashboard/outbox", "/dashboard/segments"):
        assert (await anonymous.get(path)).status_code == 200, path
    # A session cookie for another path or a forged one opens nothing.
    anonymous.cookies.clear()
    anonymous.cookies.set(COOKIE, "v1.9999999999.x.forged", path="/dashboard")
    assert (await anonymous.get("/dashboard")).status_code == 303


def test_journey_graph_draws_every_step_and_jump_including_loops() -> None:
    document = parse_journey(
        yaml.safe_load((EXAMPLES / "journeys" / "trial-nurture.yaml").read_text())
    )
    edges = {(e.source, e.target, e.label) for e in edges_of(document)}
    assert edges == {
        ("settle", "offer", ""),
        ("offer", "opened", ""),
        ("opened", "persona", "email_opened"),
        ("opened", "resend", "timeout"),
        ("resend", "resend-opened", ""),
        ("resend-opened", "persona", "email_opened"),
        ("resend-opened", "done", "timeout"),
        ("persona", "exec-track", "case 1"),
        ("persona", "practitioner-track", "else"),
        ("exec-track", "exec-done", ""),
        ("exec-done", "done", ""),
        ("practitioner-track", "done", ""),
    }
    looping = parse_journey(
        {
            "key": "loop",
            "name": "loop",
            "steps": [
                {"id": "nudge", "type": "email", "template": "t"},
                {"id": "wait", "type": "wait", "duration": "1d"},
                {"id": "again", "type": "goto", "step": "nudge"},
            ],
        }
    )
    svg = str(journey_svg(looping, {"nudge": ["sent 3 <b>"]}))
    assert svg.count('class="step"') == 3
    assert 'data-from="again" data-to="nudge"' in svg  # the loop is drawn, going back up
    assert "sent 3 &lt;b&gt;" in svg  # text is escaped
