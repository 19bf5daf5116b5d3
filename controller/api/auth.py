"""The admin API's credential on the wire, shared by the servicer (api/admin.py) and the admin client
(clients/admin.py): `authorization: Bearer <token>` call metadata; the server's token comes from
--admin-token or this environment variable."""

from __future__ import annotations

TOKEN_ENV = "SHARDSERVE_ADMIN_TOKEN"


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata a client sends."""
    return (("authorization", f"Bearer {token}"),)
