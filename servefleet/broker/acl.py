"""Redis users: the broker's admin user, and one ACL user per application for its workers.

The stack's Redis admits no anonymous client (``default`` is off): the broker holds the admin
credential (``servefleet up`` keeps it in ``<state-dir>/redis.password``, mode 0600, and writes it
into Redis's own config file, never onto a command line). A worker gets its app's credential from
the broker (``GetWorkerCredential``, with the app's endpoint token); that user may run only the
commands a pull worker (and the app's semantic cache) runs, on only that app's keys and channel.
"""

from __future__ import annotations

ADMIN_USER = "servefleet"


def redis_config(admin_password: str) -> str:
    """Redis config lines for a Redis that requires auth: no anonymous access, one admin user."""
    return f"user default off\nuser {ADMIN_USER} on >{admin_password} ~* &* +@all\n"
