"""Secrets at rest: Fernet (authenticated encryption) from `cryptography`, never hand-rolled.

The key is a Fernet key (32 random bytes, url-safe base64), the setting STEPFLEET_SECRET_KEY;
`new_key()` makes one. Several comma-separated keys rotate: the first seals, any of them opens.

`seal` / `open_sealed` protect one text. Tenant secrets go through `seal_secret` /
`open_secrets`, which seal the value together with where it may be sent (tenant, name, host,
header) and check that on opening: a ciphertext copied into another tenant's row, or onto
another host, does not open, so write access to the database is not enough to point a secret
at a host of one's choosing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SealError(ValueError):
    """A key that is not a Fernet key, or a ciphertext this key cannot open (wrong key or
    tampered); the message never holds key or plaintext material."""


class SealedSecret(Protocol):
    """A stored secret as the store returns it (stepfleet.store.StoredSecret)."""

    @property
    def tenant(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def header(self) -> str: ...
    @property
    def ciphertext(self) -> bytes: ...


def new_key() -> str:
    """A fresh random Fernet key, as text for STEPFLEET_SECRET_KEY."""
    return Fernet.generate_key().decode("ascii")


def _fernet(key: str | bytes) -> MultiFernet:
    text = key.decode("ascii", errors="replace") if isinstance(key, bytes) else key
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise SealError("the secret key is empty: set STEPFLEET_SECRET_KEY")
    fernets = []
    for index, part in enumerate(parts):
        try:
            fernets.append(Fernet(part.encode("ascii", errors="replace")))
        except ValueError:
            raise SealError(
                f"secret key {index + 1} is not a Fernet key "
                "(32 url-safe base64-encoded bytes; make one with `stepfleet secret key`)"
            ) from None
    return MultiFernet(fernets)


def check_key(key: str | bytes) -> None:
    """SealError if `key` is not one or more comma-separated Fernet keys."""
    _fernet(key)


def seal(key: str | bytes, plaintext: str) -> bytes:
    """Encrypt and authenticate `plaintext` with the (first) key."""
    return _fernet(key).encrypt(plaintext.encode("utf-8"))


def open_sealed(key: str | bytes, ciphertext: bytes) -> str:
    """Decrypt what `seal` made; SealError if no key opens it or it was tampered with."""
    try:
        data = _fernet(key).decrypt(bytes(ciphertext))
    except InvalidToken:
        raise SealError("cannot open the sealed secret: wrong key, or damaged ciphertext") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SealError("the sealed secret is not UTF-8 text") from None


def _context(tenant: str, name: str, host: str, header: str) -> dict[str, str]:
    return {"tenant": tenant, "name": name, "host": host, "header": header.lower()}


def seal_secret(
    key: str | bytes, tenant: str, name: str, host: str, header: str, value: str
) -> bytes:
    """Seal a tenant secret bound to where it may be sent (see the module docstring)."""
    payload = {**_context(tenant, name, host, header), "value": value}
    return seal(key, json.dumps(payload, ensure_ascii=False, sort_keys=True))


def open_secret(key: str | bytes, secret: SealedSecret) -> str:
    """The plaintext of a stored secret; SealError if it does not open or belongs elsewhere."""
    text = open_sealed(key, secret.ciphertext)
    try:
        payload = json.loads(text)
        value = payload.pop("value")
    except (ValueError, KeyError, AttributeError, TypeError):
        raise SealError(
            f"secret {secret.name!r} of {secret.tenant} is not a sealed secret"
        ) from None
    if not isinstance(value, str) or payload != _context(
        secret.tenant, secret.name, secret.host, secret.header
    ):
        raise SealError(
            f"secret {secret.name!r} of {secret.tenant} was sealed for another tenant, name, "
            "host or header"
        )
    return value


def open_secrets(
    key: str | bytes, stored: Iterable[SealedSecret]
) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Open every stored secret for `EgressGateway.configure`.

    Returns the (tenant, host, header, plaintext) tuples, and one message per secret that did
    not open (those are left out; the messages name tenant and secret, never a value). A key
    that is not a Fernet key raises SealError at once.
    """
    _fernet(key)
    opened: list[tuple[str, str, str, str]] = []
    problems: list[str] = []
    for secret in stored:
        try:
            opened.append((secret.tenant, secret.host, secret.header, open_secret(key, secret)))
        except SealError as exc:
            problems.append(f"secret {secret.name!r} of tenant {secret.tenant}: {exc}")
    return opened, problems
