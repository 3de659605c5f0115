"""Access control: API keys with roles, and datasets restricted to named keys.

Keys are ``nds_`` followed by 43 URL-safe characters (256 random bits from :mod:`secrets`).
Only their sha256 is stored (a slow password hash buys nothing for secrets this long),
with the first characters as a prefix to recognise a key in listings; the key itself is
shown once, when it is created. Roles:

- ``admin``: register, index and delete datasets, restrict them, manage keys, read jobs;
- ``client``: read the catalog, download experts, query, export manifests, search.

A **principal** is who is asking: a key's role and id, or :data:`LOCAL` (the operator on
the catalog's own machine: the CLI, and the API while no key exists, the "open" mode the
embedded default starts in). Admins and ``LOCAL`` see every dataset; a client sees the
unrestricted datasets and the restricted ones granted to its key, and nothing of the
others: not their rows, samples, clusters, experts, search hits or query results.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, or_, update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, select

from nds.catalog.tables import ApiKey, Dataset, DatasetGrant, Role, utcnow
from nds_client.errors import AuthenticationError, ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError

KEY_PREFIX = "nds_"
PREFIX_LENGTH = 12  # "nds_" + 8 characters
KEY_NAME_MAX = 128
MAX_ID = 2**63 - 1  # the largest row id a reference can name (64-bit)


@dataclass(frozen=True)
class Principal:
    role: Role
    key_id: int | None = None
    name: str = "local"

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin


#: the operator on the catalog's machine: the CLI, and the API while it runs open
LOCAL = Principal(role=Role.admin, key_id=None, name="local")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# --------------------------------------------------------------------------- keys


def create_key(*, session: Session, name: str, role: Role | str, secret: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key (its hash) and return it with the secret, which is never stored.

    ``secret`` lets an operator install a key generated elsewhere (e.g. a deployment's
    bootstrap key); it must be at least 32 characters. Names are unique for good: a revoked
    key keeps its name (keys are audit records, and an old key must never be mistaken for a
    new one), and a name may not be all digits (that reference is a key id)."""
    try:
        role = Role(role)
    except ValueError:
        raise InvalidInputError(f"unknown role {role!r}", field="role", hint="admin or client") from None
    name = (name or "").strip()
    if not name or len(name) > KEY_NAME_MAX:
        raise InvalidInputError("a key needs a name of 1 to 128 characters", field="name")
    if is_id_ref(name):
        raise InvalidInputError(f"invalid key name {name!r}: a name may not be all digits", field="name",
                                hint=f"an all-digit reference means a key id; add a letter, e.g. 'key-{name}'")
    if secret is None:
        secret = new_secret()
    elif len(secret) < 32:
        raise InvalidInputError("a key must be at least 32 characters long", field="key", hint="omit it to have one generated")
    existing = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
    if existing is not None:  # keys are audit records: a name is never reused, even once revoked
        state = f"revoked key (id {existing.id})" if existing.revoked_at is not None else f"key (id {existing.id})"
        raise ConflictError(f"the name {name!r} belongs to a {state}",
                            hint="key names are never reused, even after revocation: pick another name")
    key = ApiKey(name=name, role=role, prefix=secret[:PREFIX_LENGTH], key_hash=hash_key(secret))
    session.add(key)
    session.flush()
    return key, secret


def list_keys(*, session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.exec(query).all())


def is_id_ref(ref: str | int) -> bool:
    """True when ``ref`` refers to a row by id: an int, or a string of ASCII digits
    (the rule of :func:`find_key` and :func:`nds.catalog.datasets.find_dataset`)."""
    if isinstance(ref, bool):
        return False
    return isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit())


def find_key(*, session: Session, ref: str | int) -> ApiKey:
    """A key by id or by name: an int or an all-digit ``ref`` is an id, anything else a name.

    New key names may not be all digits (:func:`create_key`); a catalog that holds one from
    before that rule still finds it by name, but only when no key has that id."""
    if is_id_ref(ref):
        key = session.get(ApiKey, int(ref)) if int(ref) <= MAX_ID else None
        if key is None and isinstance(ref, str):  # an all-digit name from before the rule
            key = session.exec(select(ApiKey).where(ApiKey.name == ref)).first()
        if key is None:
            raise NotFoundError(f"no API key with id {ref}", hint="an all-digit reference is a key id; 'nds keys list' shows the ids and names")
        return key
    key = session.exec(select(ApiKey).where(ApiKey.name == str(ref))).first()
    if key is None:
        raise NotFoundError(f"no API key named {ref!r}", hint="'nds keys list' shows them")
    return key


def revoke_key(*, session: Session, ref: str | int) -> ApiKey:
    key = find_key(session=session, ref=ref)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        session.exec(delete(DatasetGrant).where(DatasetGrant.key_id == key.id))
    return key


def ever_had_keys(*, session: Session) -> bool:
    """Whether this catalog has ever had an API key. Keys are never deleted (revoking one
    keeps its row), so this is a persistent fact of the catalog: once true, never false."""
    return session.exec(select(ApiKey.id).limit(1)).first() is not None


def api_is_open(*, session: Session, auth: str, admin_key: object | None) -> bool:
    """Open mode: every request acts as :data:`LOCAL`. Only for a catalog that has never had
    a key, with ``NDS_AUTH=auto`` and no ``NDS_ADMIN_KEY``. Revoking every key, the last
    admin key included, leaves the API closed: the operator's CLI (``nds keys create``) or
    ``NDS_ADMIN_KEY`` is the way back in."""
    return auth != "required" and admin_key is None and not ever_had_keys(session=session)


def active_admin_keys(*, session: Session) -> int:
    return len(session.exec(select(ApiKey.id).where(ApiKey.revoked_at.is_(None), ApiKey.role == Role.admin)).all())


def _visible_to(key_id: Any) -> ColumnElement[bool]:  # noqa: ANN401 - a key id or a bind parameter
    """The datasets a client key may see: the unrestricted ones and those granted to it."""
    return or_(Dataset.restricted.is_(False), Dataset.id.in_(select(DatasetGrant.dataset_id).where(DatasetGrant.key_id == key_id)))


# the statements every request runs, built once (columns, not ORM objects: a request pays
# for one indexed lookup, not for building the statement and loading a mapped row)
_KEY_BY_HASH = select(ApiKey.id, ApiKey.role, ApiKey.name, ApiKey.prefix, ApiKey.revoked_at).where(ApiKey.key_hash == bindparam("key_hash"))
_VISIBLE = select(Dataset.id).where(_visible_to(bindparam("key_id")))
_VISIBLE_AMONG = _VISIBLE.where(Dataset.id.in_(bindparam("among", expanding=True)))


def authenticate(*, session: Session, secret: str, admin_key: str | None = None) -> Principal:
    """The principal of a presented key; AuthenticationError for an unknown or revoked one."""
    if admin_key and hmac.compare_digest(hash_key(secret), hash_key(admin_key)):
        return Principal(role=Role.admin, key_id=None, name="NDS_ADMIN_KEY")
    key = session.execute(_KEY_BY_HASH, {"key_hash": hash_key(secret)}).first()
    if key is None:
        raise AuthenticationError("the API key is not valid", hint="ask an admin for a key ('nds keys create --role client')")
    key_id, role, name, prefix, revoked_at = key
    if revoked_at is not None:
        raise AuthenticationError(f"the API key {prefix}... was revoked", hint="ask an admin for a new key")
    return Principal(role=Role(role), key_id=key_id, name=name)


def require_admin(principal: Principal, action: str) -> None:
    if not principal.is_admin:
        raise PermissionDeniedError(f"a {principal.role.value} key may not {action}", hint="this needs an admin key")


# --------------------------------------------------------------------------- visibility


def visible_clause(principal: Principal) -> ColumnElement[bool] | None:
    """A condition on ``Dataset`` for the datasets ``principal`` may see (None: all of them)."""
    return None if principal.is_admin else _visible_to(principal.key_id)


def visible_dataset_ids(*, session: Session | Connection, principal: Principal, among: Sequence[int] | None = None) -> set[int] | None:
    """The ids ``principal`` may see (of ``among`` when given); None means every dataset (admins).
    ``session`` may be a Session or a Core Connection."""
    if principal.is_admin:
        return None if among is None else set(among)
    if among is None:
        return set(session.execute(_VISIBLE, {"key_id": principal.key_id}).scalars().all())
    return set(session.execute(_VISIBLE_AMONG, {"key_id": principal.key_id, "among": list(among)}).scalars().all())


def can_see(*, session: Session, principal: Principal, dataset_id: int) -> bool:
    visible = visible_dataset_ids(session=session, principal=principal, among=[dataset_id])
    return visible is None or dataset_id in visible


def set_access(*, session: Session, dataset_id: int, restricted: bool, keys: Sequence[str] = ()) -> tuple[Dataset, list[ApiKey]]:
    """Restrict a dataset to the named keys (replacing earlier grants), or open it to every key."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFoundError(f"no dataset with id {dataset_id}", hint="'nds datasets list' shows the registered ones")
    if not restricted and keys:
        raise InvalidInputError("grants only apply to a restricted dataset", field="keys", hint="pass restricted=true with the keys")
    found: list[ApiKey] = []
    for ref in dict.fromkeys(keys):
        key = find_key(session=session, ref=ref)
        if key.revoked_at is not None:
            raise InvalidInputError(f"key {key.name!r} is revoked", field="keys")
        found.append(key)
    session.exec(update(Dataset).where(Dataset.id == dataset_id).values(restricted=restricted, updated_at=utcnow()))
    session.exec(delete(DatasetGrant).where(DatasetGrant.dataset_id == dataset_id))
    for key in found:
        session.add(DatasetGrant(dataset_id=dataset_id, key_id=key.id))
    session.flush()
    session.refresh(dataset)
    return dataset, found


def granted_keys(*, session: Session, dataset_id: int) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).join(DatasetGrant, DatasetGrant.key_id == ApiKey.id).where(DatasetGrant.dataset_id == dataset_id).order_by(ApiKey.id)).all())
