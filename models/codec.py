"""Encryption of workflow payloads: contact PII never reaches Temporal in the clear.

Journeys carry contacts' emails, phones, names and event properties in their inputs,
activity results and signals, all of which Temporal stores in workflow histories. With
``NURTURE_PAYLOAD_KEYS`` set, every payload (and every failure's message and stack trace)
is encrypted with AES-256-GCM before it leaves the process; the Temporal server, its
database and anyone reading histories without a key see ciphertext. The codec server
(api/routes/codec.py) decrypts for the Temporal UI and authorised operators only.

Keys are ``kid:base64key`` pairs, comma separated: the first encrypts, all decrypt, so a
key is rotated by putting a new one first and dropping the old one once no open history
needs it. Each encrypted payload names its key id in its metadata (and binds it as
associated data, so a payload cannot be passed off under another key id).

With no keys configured payloads stay plain JSON; payloads that were never encrypted
(histories from before keys were set) always decode.

    python -m models.codec new-key [kid]     # prints a fresh kid:base64key
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import sys
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from settings import Settings

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12


class PayloadKeyError(ValueError):
    """A payload that cannot be decrypted: unknown key id, or tampered with."""


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """``kid:base64key,...`` into (kid, key) pairs; ValueError naming what is wrong."""
    keys: list[tuple[str, bytes]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kid, sep, encoded = item.partition(":")
        if not sep or not kid.strip():
            raise ValueError("NURTURE_PAYLOAD_KEYS: each key is kid:base64key")
        kid = kid.strip()
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise ValueError(f"NURTURE_PAYLOAD_KEYS: key {kid!r} is not base64") from None
        if len(key) != 32:
            raise ValueError(
                f"NURTURE_PAYLOAD_KEYS: key {kid!r} has {len(key)} bytes; AES-256 needs 32"
            )
        if any(kid == known for known, _ in keys):
            raise ValueError(f"NURTURE_PAYLOAD_KEYS: key id {kid!r} appears twice")
        keys.append((kid, key))
    return keys


def new_key(kid: str | None = None) -> str:
    kid = kid or f"k{secrets.token_hex(4)}"
    return f"{kid}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("the encryption codec needs at least one key")
        self.encrypt_kid = keys[0][0]
        self.ciphers = {kid: AESGCM(key) for kid, key in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        kid = self.encrypt_kid.encode()
        sealed = self.ciphers[self.encrypt_kid].encrypt(nonce, payload.SerializeToString(), kid)
        return Payload(metadata={"encoding": ENCODING, KEY_ID: kid}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        """The original payload; one that is not encrypted is returned as it is."""
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID, b"").decode("utf-8", "replace")
        cipher = self.ciphers.get(kid)
        if cipher is None:
            raise PayloadKeyError(f"payload encrypted with unknown key id {kid!r}")
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise PayloadKeyError(f"payload under key id {kid!r} fails authentication") from None
        return Payload.FromString(plain)


def payload_codec(settings: Settings) -> EncryptionCodec | None:
    keys = parse_keys(settings.payload_keys)
    return EncryptionCodec(keys) if keys else None


def data_converter(settings: Settings) -> DataConverter:
    """The data converter every Temporal client Nurture builds must use (worker, API,
    scripts, tests that read histories as Nurture does)."""
    codec = payload_codec(settings)
    if codec is None:
        return DataConverter.default
    return DataConverter(
        payload_codec=codec,
        # Failure messages and stack traces may quote contact data: encrypt them too.
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["new-key"]:
        raise SystemExit("usage: python -m models.codec new-key [kid]")
    print(new_key(sys.argv[2] if len(sys.argv) > 2 else None))
