"""The SSRF guard on outbound calls to user-supplied URLs (webhook steps, CRM adapters).

Vetting is tested on its own (there is no internet here, so public targets are vetted,
never connected to); connecting, pinning and redirects against a local server that the
allow-list lets through.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities import outbound
from settings import Settings
from tests.helpers import contact, enroll, unique
from tests.test_journey_language import Receiver, journey, outcome, state
from tests.test_journey_workflow import messages_of, result_of
from worker import build_worker


def fixed(*addresses: str) -> outbound.Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


async def refusal(url: str, allow: str = "", **kw: Any) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await outbound.vet_url(url, allow, **kw)
    err = caught.value
    assert err.type == "OutboundRefused" and err.non_retryable
    assert url in str(err)
    return err


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1.2.3:8080/hook",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://api.localhost:8000/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.10/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://[::1]/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::127.0.0.1]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:7f00:1::]/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0x7f.1/",
        "http://017700000001/",
        "https://127.0.0.1:443/",
    ],
)
async def test_vet_url_refuses_non_public_targets(url: str) -> None:
    await refusal(url)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)"],
)
async def test_vet_url_refuses_schemes_other_than_http(url: str) -> None:
    err = await refusal(url, resolve=fixed("93.184.216.34"))
    assert "scheme" in str(err) or "no host" in str(err)


async def test_vet_url_refuses_a_name_when_any_address_is_private() -> None:
    err = await refusal("https://crm.example.com/hook", resolve=fixed("93.184.216.34", "10.0.0.5"))
    assert "10.0.0.5 is private" in str(err) and "crm.example.com" in str(err)


async def test_vet_url_refuses_a_name_that_resolves_to_loopback() -> None:
    err = await refusal("https://intranet.example.com/", resolve=fixed("127.0.0.1"))
    assert "127.0.0.1 is loopback; 'intranet.example.com' resolves to it" in str(err)
    await refusal("https://v6.example.com/", resolve=fixed("::ffff:7f00:1"))


async def test_https_requests_keep_the_hostname_for_sni_and_certificates() -> None:
    target = await outbound.vet_url("https://crm.example.com/x?y=1", "", resolve=fixed("8.8.8.8"))
    request = httpx.Request("POST", target.url)
    outbound.pin(target, request)
    assert str(request.url) == "https://8.8.8.8/x?y=1"
    assert request.headers["Host"] == "crm.example.com"
    assert request.extensions["sni_hostname"] == "crm.example.com"


async def test_vet_url_explains_an_embedded_address() -> None:
    err = await refusal("http://[::ffff:127.0.0.1]/")
    assert "embeds 127.0.0.1, which is loopback" in str(err)


async def test_vet_url_allows_public_literals_without_connecting() -> None:
    v4 = await outbound.vet_url("http://93.184.216.34/hook", "")
    assert str(v4.ip) == "93.184.216.34" and v4.host == "93.184.216.34"
    v6 = await outbound.vet_url("https://[2606:2800:220:1:248:1893:25c8:1946]/", "")
    assert str(v6.ip) == "2606:2800:220:1:248:1893:25c8:1946"
    named = await outbound.vet_url("https://crm.example.com/x", "", resolve=fixed("8.8.8.8"))
    assert named.host == "crm.example.com" and str(named.ip) == "8.8.8.8"


async def test_allow_list_lets_named_hosts_and_ranges_through() -> None:
    assert str((await outbound.vet_url("http://127.0.0.1:9/", "127.0.0.1")).ip) == "127.0.0.1"
    assert (await outbound.vet_url("http://[::1]/", "127.0.0.1, ::1")).host == "::1"
    internal = await outbound.vet_url("http://10.1.2.3/", "10.0.0.0/8")
    assert str(internal.ip) == "10.1.2.3"
    await refusal("http://192.168.0.1/", "10.0.0.0/8")
    by_name = await outbound.vet_url(
        "https://crm.corp.internal/api", "crm.corp.internal", resolve=fixed("10.9.9.9")
    )
    assert str(by_name.ip) == "10.9.9.9"
    await refusal("https://other.corp.internal/api", "crm.corp.internal", resolve=fixed("10.9.9.9"))


class Server:
    """A local HTTP server: answers 200 on /ok, redirects /redirect to ``location``."""

    def __init__(self, location: str = "") -> None:
        self.calls: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.calls.append({"path": self.path, "headers": dict(self.headers)})
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", location or f"{server.url}/secret")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server("http://169.254.169.254/latest/meta-data/")
    yield s
    s.close()


async def test_request_refuses_loopback_unless_allowed(server: Server) -> None:
    with pytest.raises(ApplicationError, match=r"127\.0\.0\.1 is loopback"):
        await outbound.request("GET", f"{server.url}/ok", allow_private="")
    assert server.calls == []
    response = await outbound.request("GET", f"{server.url}/ok", allow_private="127.0.0.1")
    assert response.status_code == 200 and len(server.calls) == 1


async def test_request_connects_to_the_vetted_address_with_the_original_host(
    server: Server,
) -> None:
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding DNS
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    response = await outbound.request(
        "GET",
        f"http://hooks.rebind.test:{server.port}/ok?x=1",
        allow_private="hooks.rebind.test",
        resolve=rebinding,
    )
    assert response.status_code == 200
    assert lookups == ["hooks.rebind.test"]  # resolved once, then pinned
    [call] = server.calls
    assert call["path"] == "/ok?x=1"
    assert call["headers"]["Host"] == f"hooks.rebind.test:{server.port}"


async def test_request_does_not_follow_a_redirect_into_private_space(server: Server) -> None:
    response = await outbound.request("GET", f"{server.url}/redirect", allow_private="127.0.0.1")
    assert response.status_code == 302
    assert response.headers["Location"] == "http://169.254.169.254/latest/meta-data/"
    assert [c["path"] for c in server.calls] == ["/redirect"]


async def test_request_does_not_follow_redirects_at_all() -> None:
    same_host = Server()
    try:
        response = await outbound.request(
            "GET", f"{same_host.url}/redirect", allow_private="127.0.0.1"
        )
    finally:
        same_host.close()
    assert response.status_code == 302
    assert [c["path"] for c in same_host.calls] == ["/redirect"]


async def test_request_rejects_unresolvable_names_as_retryable() -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(RuntimeError, match="cannot resolve"):
        await outbound.request(
            "GET", "https://nowhere.invalid/", allow_private="", resolve=nxdomain
        )


async def test_webhook_step_refuses_a_loopback_url_and_the_journey_goes_on(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
) -> None:
    strict = settings.model_copy(update={"outbound_allow_private": ""})
    receiver = Receiver([200])
    try:
        after = unique("after")
        key = await journey(
            time_api,
            [
                {"id": "notify", "type": "webhook", "url": f"{receiver.url}/hooks/lead"},
                {"id": "after", "type": "email", "template": after},
            ],
        )
        person = await contact(time_api)
        async with build_worker(time_env.client, strict):
            enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
            await result_of(time_env, enrolled["workflow_id"])
            view = await state(time_api, enrolled["id"])
    finally:
        receiver.close()
    assert receiver.calls == []
    reason = outcome(view, "notify")
    assert reason.startswith("webhook failed:") and "refused" in reason
    assert "127.0.0.1 is loopback" in reason
    assert [m.step_id for m in await messages_of(settings, enrolled["id"])] == ["after"]
