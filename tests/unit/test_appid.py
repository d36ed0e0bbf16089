"""AppId: one naming rule, parse, key and wire model name, used alike by every part."""

from __future__ import annotations

import pytest

from servefleet.api import common_pb2
from servefleet.broker.worker import PullWorker
from servefleet.common.appid import AppId
from servefleet.common.errors import InvalidArgument
from servefleet.spec import load_spec


def test_every_form_parses_to_one_identity() -> None:
    iris = AppId("default", "iris")
    assert AppId.parse("iris") == AppId.parse("default/iris") == iris
    assert AppId.parse(common_pb2.AppRef(name="iris")) == AppId.parse(iris.ref()) == iris
    assert AppId.parse(load_spec({"name": "iris", "import_path": "m:C"})) == iris
    assert (iris.key, iris.model_name, str(iris)) == ("default/iris", "iris", "default/iris")
    team = AppId.parse("team-a/iris")
    assert (team.key, team.model_name) == ("team-a/iris", "team-a/iris")
    for wire in ("iris", "team-a/iris"):  # the wire model name parses back to the same app
        assert AppId.parse(AppId.parse(wire).model_name).model_name == wire


@pytest.mark.parametrize(
    "app", ["", "/", "a/", "/a", "a/b/c", "-x", "x" * 64, "sp ace", "ns/na\u00efve", "Team/llm", "a.b"]
)
def test_one_rule_rejects_bad_names(app: str) -> None:
    with pytest.raises(InvalidArgument, match=r"application (name|namespace)"):
        AppId.parse(app)


async def test_a_pull_worker_for_a_bare_name_serves_namespace_default() -> None:
    async def handler(request: object) -> object:
        return request

    worker = PullWorker("127.0.0.1:1", "iris", "c1", 1, handler)  # type: ignore[arg-type]
    assert worker.app == "default/iris"
