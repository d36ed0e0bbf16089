"""The broker's Redis key layout and ticket ids: one place, so queue.py, the Lua scripts and the
per-app Redis ACL users agree.

Every key and the events channel of an app carry the hash tag ``{namespace/name}``, so each app
lives in one Redis Cluster slot (every Lua script of an app touches one slot) while different apps
spread over the slots; one ACL pattern (``APP_PATTERN``) covers all of an app's keys.

A ticket names its app: ``<namespace>.<name>.<32 hex digits>`` (names are DNS labels, so they hold
no dot), so GetResult and Cancel find the ticket's keys from the ticket alone.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from servefleet.common.appid import AppId
from servefleet.common.errors import InvalidArgument

#: Bands of priority, drained in this order (the streams' last key segment).
BANDS: tuple[str, ...] = ("high", "normal", "low")
_TICKET = re.compile(r"^([a-z0-9-]{1,63})\.([a-z0-9-]{1,63})\.([0-9a-f]{32})$")


def tag(app: str) -> str:
    """``{namespace/name}``: the hash tag of every key of ``app`` (``namespace/name``)."""
    return f"{{{AppId.parse(app).key}}}"


def prefix(app: str) -> str:
    """What every key and channel of ``app`` starts with."""
    return f"sf:broker:{tag(app)}:"


@dataclass(frozen=True)
class AppKeys:
    """The keys of one app (``namespace/name``)."""

    app: str

    @property
    def base(self) -> str:
        return prefix(self.app)

    @property
    def config(self) -> str:
        """Hash: the app is known; its limits."""
        return self.base + "app"

    def stream(self, band: int) -> str:
        return f"{self.base}q:{BANDS[band]}"

    @property
    def streams(self) -> list[str]:
        return [self.stream(band) for band in range(len(BANDS))]

    @property
    def dead_letters(self) -> str:
        return self.base + "dlq"

    @property
    def ticket_prefix(self) -> str:
        return self.base + "t:"

    def ticket(self, ticket: str) -> str:
        return self.ticket_prefix + ticket

    def result(self, ticket: str) -> str:
        return f"{self.base}r:{ticket}"

    def idempotency(self, key: str) -> str:
        return f"{self.base}idem:{key}"

    def counter(self, kind: str, bucket: int) -> str:
        return f"{self.base}n:{kind}:{bucket}"

    @property
    def workers(self) -> str:
        return self.base + "w"

    @property
    def duplicates(self) -> str:
        return self.base + "dup"

    @property
    def events(self) -> str:
        """Channel: ``"<ticket> <STATE>"`` on every change of one of the app's tickets."""
        return self.base + "events"


#: Every app's config hash (SCAN) and events channel (PSUBSCRIBE).
CONFIG_PATTERN = "sf:broker:{*}:app"
EVENTS_PATTERN = "sf:broker:{*}:events"


def app_pattern(app: str) -> str:
    """The glob matching every key (and the channel) of ``app``: what its ACL user may touch.
    ``[``/``]``/``*``/``?`` cannot occur in names, and ``{``/``}`` are literal in Redis globs."""
    return prefix(app) + "*"


def new_ticket(app: str) -> str:
    parsed = AppId.parse(app)
    return f"{parsed.namespace}.{parsed.name}.{uuid.uuid4().hex}"


def ticket_app(ticket: str) -> str:
    """The ``namespace/name`` a ticket belongs to; InvalidArgument when it is malformed."""
    found = _TICKET.match(ticket)
    if found is None:
        raise InvalidArgument(
            f"ticket {ticket!r} is malformed: tickets are <namespace>.<name>.<32 hex digits> "
            "(tickets of brokers before the per-app key layout are not readable)"
        )
    return f"{found[1]}/{found[2]}"
