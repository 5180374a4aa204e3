"""Any SMTP server, with smtplib: one connection per message, STARTTLS when asked."""

from __future__ import annotations

import smtplib
import ssl
from typing import NoReturn

from activities.providers import ProviderRejected, ProviderRetryable, may_have_reached
from activities.providers.outbox import OutgoingEmail, build_email_message


class SmtpEmailProvider:
    name = "smtp"
    idempotent = False

    def __init__(
        self,
        host: str,
        port: int = 587,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.starttls, self.timeout = starttls, timeout

    def send(self, email: OutgoingEmail) -> str | None:
        """Deliver the message to the server; return its Message-ID."""
        message = build_email_message(email)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as err:
            # The only recipient was refused: 5xx is for good, 4xx is "try later".
            code, reply = next(iter(err.recipients.values()))
            _raise(code, reply)
        except smtplib.SMTPResponseException as err:
            _raise(err.smtp_code, err.smtp_error)
        except (smtplib.SMTPException, OSError) as err:
            raise ProviderRetryable(
                f"SMTP server {self.host}:{self.port}: {err}",
                may_have_reached=may_have_reached(err),
            ) from err
        return str(message["Message-ID"])


def _raise(code: int, reply: bytes | str) -> NoReturn:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    detail = f"SMTP server answered {code}: {text}"
    if 500 <= code < 600:
        raise ProviderRejected(detail) from None
    raise ProviderRetryable(detail) from None
