"""Artifact keys: what a safe key is, and the tenant-bounded layout.

Everything a tenant's work stores lives under `tenants/<tenant>/` (`tenant_key`); a key that
arrives in an event or a request is checked against the tenant it is for (`check_tenant_key`).
Pure (no store client), so a service's core can name keys.
"""

from __future__ import annotations

import re


class InvalidKey(ValueError):
    """A key that is empty, absolute, has `..`/empty segments or backslashes."""


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidKey naming it.

    A prefix may end with `/` (a directory); an object key may not (S3 folder markers would
    not round-trip through the local backend)."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid artifact key {key!r}: empty")
    why = None
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        why = "absolute path"
    elif "\\" in key:
        why = "backslash"
    elif "\x00" in key:
        why = "NUL byte"
    elif len(key.encode()) > 1024:
        why = "longer than 1024 bytes"
    else:
        parts = key[:-1].split("/") if prefix and key.endswith("/") else key.split("/")
        if any(p in ("..", ".") for p in parts):
            why = "'.' or '..' segment"
        elif any(p == "" for p in parts):
            why = "empty segment (// or trailing /)"
    if why:
        raise InvalidKey(f"invalid artifact key {key!r}: {why}")
    return key


TENANTS = "tenants"


def _tenant_segment(tenant: str) -> str:
    if "/" in tenant or tenant in ("", ".", ".."):
        raise InvalidKey(f"tenant {tenant!r} cannot be a key segment")
    return tenant


def tenant_key(tenant: str, *parts: str) -> str:
    """`parts` under `tenant`'s own prefix, `tenants/<tenant>/...`: everything a tenant's work
    stores lives there, so a policy (or a check) on the prefix bounds what it reaches."""
    return validate_key("/".join((TENANTS, _tenant_segment(tenant), *parts)))


def check_tenant_key(key: str, tenant: str, what: str = "artifact key") -> str:
    """Return `key` if it lies under `tenant`'s prefix, else raise InvalidKey: keys that come
    from events or requests name the tenant's own artifacts, never another's or a shared one."""
    validate_key(key, prefix=True)
    if not key.startswith(f"{TENANTS}/{_tenant_segment(tenant)}/"):
        raise InvalidKey(f"{what} {key!r} is not under tenant {tenant!r}'s "
                         f"prefix {TENANTS}/{tenant}/")
    return key
