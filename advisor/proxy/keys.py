"""Virtual keys: made, hashed, listed, revoked and updated (by `advisor proxy keys ...` and `/admin/keys`).

A key is `sk-adv-` and 43 characters of `secrets.token_urlsafe(32)` (256 bits). Only its HMAC-SHA256
under the deployment's pepper is stored (`hash_key`), so a copy of the database does not let anyone in;
the pepper is `auth.pepper_env`'s secret, or derived from the master key. A key is shown once, when made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from advisor.proxy.store import Store, keys

PREFIX = "sk-adv-"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,199}$")


class KeyError_(ValueError):
    """A key operation that cannot be done (unknown name, taken name, bad field): one line."""


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def pepper_from(master_key: str, pepper: str | None = None) -> bytes:
    if pepper:
        return pepper.encode()
    return hmac.new(master_key.encode(), b"advisor-proxy virtual key pepper", hashlib.sha256).digest()


def hash_key(key: str, pepper: bytes) -> str:
    return hmac.new(pepper, key.encode("latin-1", "replace"), hashlib.sha256).hexdigest()


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise KeyError_(f"expires: '{text}' is not a duration (e.g. 30d, 12h, 90m, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2)]


class KeySpec(BaseModel):
    """The fields of a key a create or update sets (None: unchanged on update, none on create)."""

    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = Field(default=None, ge=0)
    period: Literal["day", "month", "total"] | None = None
    rpm: int | None = Field(default=None, ge=1)
    models: list[str] | None = None
    expires: str | None = None  # a duration from now (30d), or "never"

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    def values(self, now: float) -> dict:
        out: dict = {}
        for name in ("max_usd", "period", "rpm"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.models is not None:
            out["models"] = ",".join(self.models)
        if self.expires is not None:
            out["expires_at"] = None if self.expires == "never" else now + parse_duration(self.expires)
        return out


@dataclass(frozen=True)
class KeyRecord:
    """A key as the proxy checks it (never the key itself)."""

    name: str
    key_hash: str
    hint: str
    max_usd: float | None
    period: str
    rpm: int | None
    models: tuple[str, ...]
    expires_at: float | None
    revoked_at: float | None
    created_at: float
    last_used_at: float | None

    @classmethod
    def from_row(cls, r) -> KeyRecord:
        m = r._mapping
        return cls(**{**m, "models": tuple(p for p in (m["models"] or "").split(",") if p)})

    def public(self, spent: float | None = None, reserved: float | None = None) -> dict:
        """What `keys list` and GET /admin/keys show: everything but the hash."""
        d = {k: v for k, v in self.__dict__.items() if k != "key_hash"}
        d["models"] = list(self.models)
        d["state"] = self.state()
        if spent is not None:
            d["spent_usd"], d["reserved_usd"] = spent, reserved
        return d

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeyError_(
            f"name: '{name}' must be 1-200 letters, digits or _.@+- (starting with a letter or digit)"
        )
    return name


async def create_key(store: Store, pepper: bytes, name: str, spec: KeySpec) -> tuple[KeyRecord, str]:
    """A new key named `name`: (its record, the key itself, to show once)."""
    _check_name(name)
    if await get_key(store, name) is not None:
        raise KeyError_(f"a key named '{name}' exists; revoke it or pick another name")
    secret = new_key()
    now = time.time()
    values = {"period": "total", "models": "", **spec.values(now)}
    await store.execute(
        sa.insert(keys).values(
            name=name,
            key_hash=hash_key(secret, pepper),
            hint=secret[: len(PREFIX) + 4],
            created_at=now,
            **values,
        )
    )
    record = await get_key(store, name)
    assert record is not None
    return record, secret


async def get_key(store: Store, name: str) -> KeyRecord | None:
    rows = await store.fetch(sa.select(keys).where(keys.c.name == name))
    return KeyRecord.from_row(rows[0]) if rows else None


async def all_keys(store: Store) -> list[KeyRecord]:
    return [KeyRecord.from_row(r) for r in await store.fetch(sa.select(keys).order_by(keys.c.name))]


async def key_by_hash(store: Store, key_hash: str) -> KeyRecord | None:
    rows = await store.fetch(sa.select(keys).where(keys.c.key_hash == key_hash))
    return KeyRecord.from_row(rows[0]) if rows else None


async def update_key(store: Store, name: str, spec: KeySpec) -> KeyRecord:
    values = spec.values(time.time())
    if values and not await store.execute(sa.update(keys).where(keys.c.name == name).values(**values)):
        raise KeyError_(f"no key named '{name}'")
    record = await get_key(store, name)
    if record is None:
        raise KeyError_(f"no key named '{name}'")
    return record


async def revoke_key(store: Store, name: str) -> KeyRecord:
    now = time.time()
    await store.execute(
        sa.update(keys).where(keys.c.name == name, keys.c.revoked_at.is_(None)).values(revoked_at=now)
    )
    record = await get_key(store, name)
    if record is None:
        raise KeyError_(f"no key named '{name}'")
    return record


async def listing(store: Store) -> list[dict]:
    """Every key with its spend in its current period (no key, no hash)."""
    out = []
    await store.flush()
    for k in await all_keys(store):
        spent, reserved = await store.spent(k.name, k.period)
        out.append(k.public(spent, reserved))
    return out
