from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlmodel import col, select

from activities.contacts import snapshot
from activities.rendering import (
    TemplateError,
    check_template,
    render_context,
    render_email,
    render_text,
)
from api.deps import SessionDep
from api.schemas import PreviewIn, PreviewOut, TemplateIn, TemplatePublic
from api.services import find_contact
from models.journey import KEY_PATTERN
from models.tables import Template, TemplateChannel, utcnow

router = APIRouter(prefix="/templates", tags=["templates"])

TemplateKey = Annotated[str, Path(pattern=KEY_PATTERN, description="Template key, [a-z0-9-].")]


@router.put("/{key}", response_model=TemplatePublic)
async def put_template(
    key: TemplateKey, body: TemplateIn, session: SessionDep, response: Response
) -> TemplatePublic:
    """Create or replace a template; it must compile (Jinja2 syntax is checked here)."""
    try:
        check_template("subject", body.subject)
        check_template("html", body.html, html=True)
        check_template("text", body.text)
    except TemplateError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"template {key}: {err}"
        ) from None
    template = (await session.exec(select(Template).where(Template.key == key))).first()
    response.status_code = status.HTTP_200_OK if template else status.HTTP_201_CREATED
    if template is None:
        template = Template(key=key, channel=TemplateChannel(body.channel))
    template.channel = TemplateChannel(body.channel)
    template.subject, template.html, template.text = body.subject, body.html, body.text
    template.updated_at = utcnow()
    session.add(template)
    await session.flush()
    return TemplatePublic.model_validate(template, from_attributes=True)


@router.get("/{key}", response_model=TemplatePublic)
async def get_template(key: TemplateKey, session: SessionDep) -> TemplatePublic:
    template = (await session.exec(select(Template).where(Template.key == key))).first()
    if template is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template with key {key!r}")
    return TemplatePublic.model_validate(template, from_attributes=True)


@router.get("", response_model=list[TemplatePublic])
async def list_templates(session: SessionDep) -> list[TemplatePublic]:
    rows = (await session.exec(select(Template).order_by(col(Template.key)))).all()
    return [TemplatePublic.model_validate(t, from_attributes=True) for t in rows]


@router.post("/{key}/preview", response_model=PreviewOut)
async def preview_template(key: TemplateKey, body: PreviewIn, session: SessionDep) -> PreviewOut:
    """Render the template against a chosen contact (and trigger data), as it would be sent."""
    template = (await session.exec(select(Template).where(Template.key == key))).first()
    if template is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template with key {key!r}")
    contact = await find_contact(session, body)
    context = render_context(
        snapshot(contact).__dict__, {"key": body.journey} if body.journey else None, body.trigger
    )
    try:
        if template.channel == TemplateChannel.email:
            rendered = render_email(template.subject, template.html, template.text, context)
            return PreviewOut(
                channel=template.channel,
                subject=rendered.subject,
                html=rendered.html,
                text=rendered.text,
            )
        return PreviewOut(
            channel=template.channel,
            subject=None,
            html=None,
            text=render_text(template.text or "", context),
        )
    except TemplateError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"template {key}: {err}"
        ) from None
