"""``AppId``: the one identity of an application, with its one naming rule.

Every part names an application the same way: ``AppId.parse`` accepts ``"namespace/name"``, a
bare ``"name"`` (namespace ``default``), an ``AppRef`` (an empty namespace is ``default``) or
anything with ``namespace`` and ``name`` (a spec), and refuses what the rule refuses with
INVALID_ARGUMENT. From it: ``key`` (``namespace/name``: etcd keys, Redis keys, Ray actor names,
logs), ``model_name`` (the KServe ``model_name`` on the wire: ``name`` in namespace ``default``,
else ``namespace/name``) and ``ref()`` (the ``AppRef`` message).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from servefleet.api import common_pb2
from servefleet.common.errors import InvalidArgument

DEFAULT_NAMESPACE = "default"
#: The one rule for namespaces, application names and tenants: a DNS label (it never holds "/",
#: so ``namespace/name`` splits one way only, and it is a valid key segment everywhere).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_name(value: str, what: str) -> str:
    """``value`` if it follows the naming rule; InvalidArgument naming ``what`` otherwise."""
    if not value:
        raise InvalidArgument(f"{what}: required")
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{what}: {value!r} must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


class Named(Protocol):
    """An AppRef, an ApplicationSpec: anything that carries a namespace and a name."""

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True, order=True)
class AppId:
    """A valid application identity (constructing one checks both parts)."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        check_name(self.namespace, "application namespace")
        check_name(self.name, "application name")

    @classmethod
    def parse(cls, app: str | Named) -> AppId:
        """``"namespace/name"``, ``"name"`` (namespace default), an AppRef or a spec -> AppId."""
        if isinstance(app, AppId):
            return app
        if isinstance(app, str):
            namespace, sep, name = app.rpartition("/")
            return cls(namespace if sep else DEFAULT_NAMESPACE, name)
        return cls(app.namespace or DEFAULT_NAMESPACE, app.name)

    @property
    def key(self) -> str:
        """``namespace/name``: how stores, actor names and logs write the app."""
        return f"{self.namespace}/{self.name}"

    @property
    def model_name(self) -> str:
        """The KServe ``model_name``: ``name`` in namespace default, else ``namespace/name``."""
        return self.name if self.namespace == DEFAULT_NAMESPACE else self.key

    def ref(self) -> common_pb2.AppRef:
        return common_pb2.AppRef(namespace=self.namespace, name=self.name)

    def __str__(self) -> str:
        return self.key
