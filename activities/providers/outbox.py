"""The local outbox: every email saved as an .eml file, browsable, sent nowhere.

The file is named by our message id and written atomically, so a retried send
leaves exactly one copy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from models.tables import utcnow


@dataclass
class OutgoingEmail:
    message_id: str
    to: str
    sender: str
    subject: str
    html: str | None
    text: str | None
    headers: dict[str, str] = field(default_factory=dict)
    # Where the message comes from, for providers that tag messages (SendGrid custom_args).
    journey_key: str | None = None
    step_id: str | None = None
    variant: str | None = None


def build_email_message(email: OutgoingEmail) -> EmailMessage:
    """The MIME message: text part, optional HTML alternative, our id in the headers."""
    message = EmailMessage()
    message["From"] = email.sender
    message["To"] = email.to
    message["Subject"] = email.subject
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = make_msgid(idstring=email.message_id, domain="nurture.localhost")
    message["X-Nurture-Message-Id"] = email.message_id
    for name, value in email.headers.items():
        message[name] = value
    message.set_content(email.text or "")
    if email.html:
        message.add_alternative(email.html, subtype="html")
    return message


class OutboxEmailProvider:
    name = "outbox"
    idempotent = True  # the file is named by our message id

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "email"

    def path_for(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.eml"

    def send(self, email: OutgoingEmail) -> str:
        """Write the message; return the provider message id (the file name)."""
        target = self.path_for(email.message_id)
        if target.exists():
            return target.name
        self.directory.mkdir(parents=True, exist_ok=True)
        message = build_email_message(email)
        partial = target.with_suffix(".eml.partial")
        partial.write_bytes(bytes(message))
        os.replace(partial, target)
        return target.name


@dataclass
class OutgoingSms:
    message_id: str
    to: str
    sender: str
    body: str


class OutboxSmsProvider:
    name = "outbox"
    idempotent = True  # the file is named by our message id

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "sms"

    def send(self, sms: OutgoingSms) -> str:
        """Write the text as JSON named by our message id; return that name."""
        target = self.directory / f"{sms.message_id}.json"
        if target.exists():
            return target.name
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".json.partial")
        partial.write_text(
            json.dumps(
                {
                    "id": sms.message_id,
                    "to": sms.to,
                    "from": sms.sender,
                    "body": sms.body,
                    "created_at": utcnow().isoformat(),
                },
                indent=2,
            )
        )
        os.replace(partial, target)
        return target.name
