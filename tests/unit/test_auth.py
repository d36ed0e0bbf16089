"""The credential model without a network: who may call what, fail closed, precise refusals."""

from __future__ import annotations

import pytest

from servefleet.common.auth import ALLOWED, Principal, authorize, resolve_token
from servefleet.common.errors import NotFound, PermissionDenied
from servefleet.common.server import GrpcServer

ADMIN = Principal("admin", "admin")
ALPHA = Principal("alpha", "tenant", ("alpha",))
ALPHA_WEB = Principal("endpoint", "endpoint", app="alpha/web")


def test_roles_per_method_and_admin_everywhere() -> None:
    for service, methods in ALLOWED.items():
        for method in methods:
            authorize(f"/{service}/{method}", ADMIN)
    authorize("/servefleet.api.Discovery/Resolve", ALPHA)
    with pytest.raises(
        PermissionDenied, match="Register needs a token of role admin, endpoint; tenant 'alpha'"
    ):
        authorize("/servefleet.api.Discovery/Register", ALPHA)
    with pytest.raises(PermissionDenied, match="ApplyApplication needs a token of role admin, keeper"):
        authorize("/servefleet.api.ClusterAgent/ApplyApplication", Principal("agent", "agent"))
    with pytest.raises(PermissionDenied, match="not open to any caller"):
        authorize("/servefleet.api.Discovery/NoSuchMethod", ADMIN)


def test_a_server_whose_methods_are_not_all_listed_does_not_start() -> None:
    from servefleet.common.auth import Authenticator

    class NoTokens:
        async def token(self, digest: str) -> None:
            return None

        async def tenant(self, name: str) -> None:
            return None

    with pytest.raises(RuntimeError, match=r"/grpc\.health\.v1\.Health/Check has no entry"):
        GrpcServer("x", "127.0.0.1:0", [], ["grpc.health.v1.Health"], auth=Authenticator(NoTokens()))


def test_endpoint_tokens_serve_one_app_and_tenants_see_their_namespaces() -> None:
    ALPHA_WEB.require_serves("alpha", "web")
    ADMIN.require_serves("beta", "api")
    with pytest.raises(
        PermissionDenied, match="endpoint token of alpha/web may not register endpoints of alpha/api"
    ):
        ALPHA_WEB.require_serves("alpha", "api")
    with pytest.raises(PermissionDenied, match="tenant 'alpha' may not register"):
        ALPHA.require_serves("alpha", "web")
    with pytest.raises(NotFound, match="application beta/api not found"):
        ALPHA.require_visible("beta", "api")
    assert not ALPHA_WEB.sees("alpha")  # an endpoint token reads nothing
    assert Principal("scaler", "autoscaler").visible() is None


def test_an_explicit_empty_token_never_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEFLEET_TOKEN", "sft_from_env")
    assert resolve_token() == "sft_from_env"
    assert resolve_token("") == ""  # platform parts pass theirs: a user's variable never leaks in
    assert resolve_token("sft_given") == "sft_given"
