"""``servefleet up``'s plan for a 3-member etcd and several discovery instances (no process starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from servefleet import stack


def flag(part: stack.Part, name: str) -> str:
    return part.argv[part.argv.index(name) + 1]


def test_three_etcd_members_and_two_discovery_instances(tmp_path: Path) -> None:
    config = stack.StackConfig(state_dir=tmp_path, base_port=7400, etcd_members=3, discovery_instances=2)
    parts = {p.name: p for p in stack.plan(config)}
    members = [parts["etcd"], parts["etcd2"], parts["etcd3"]]
    assert [m.address for m in members] == ["127.0.0.1:7400", "127.0.0.1:7440", "127.0.0.1:7442"]
    cluster = "etcd=http://127.0.0.1:7401,etcd2=http://127.0.0.1:7441,etcd3=http://127.0.0.1:7443"
    assert {flag(m, "--initial-cluster") for m in members} == {cluster}
    assert {flag(m, "--data-dir") for m in members} == {str(tmp_path / n) for n in ("etcd", "etcd2", "etcd3")}
    every_etcd = "127.0.0.1:7400,127.0.0.1:7440,127.0.0.1:7442"
    both = "127.0.0.1:7404,127.0.0.1:7450"
    assert [parts[n].address for n in ("discovery", "discovery2")] == both.split(",")
    assert parts["discovery2"].metrics == "127.0.0.1:7470"
    for name in ("discovery", "discovery2", "broker", "keeper", "agent", "autoscaler"):
        assert flag(parts[name], "--etcd") == every_etcd, name
    for name in ("agent", "autoscaler"):
        assert flag(parts[name], "--discovery") == both, name
    # Each instance is probed as what it is, and every address of a service is in one place.
    assert parts["etcd3"].kind == "etcd" and parts["discovery2"].kind == "discovery"
    ports = [int(p.address.rsplit(":", 1)[1]) for p in parts.values() if p.address]
    ports += [int(p.metrics.rsplit(":", 1)[1]) for p in parts.values() if p.metrics]
    assert len(ports) == len(set(ports))


def test_external_etcd_cluster_and_bad_member_counts(tmp_path: Path) -> None:
    config = stack.StackConfig(state_dir=tmp_path, etcd="10.0.0.1:2379,10.0.0.2:2379")
    parts = stack.plan(config)
    assert [(p.name, p.address, p.external) for p in parts[:2]] == [
        ("etcd", "10.0.0.1:2379", True),
        ("etcd2", "10.0.0.2:2379", True),
    ]
    assert stack.joined(parts, "etcd") == "10.0.0.1:2379,10.0.0.2:2379"
    with pytest.raises(stack.StackError, match="odd quorum"):
        stack.plan(stack.StackConfig(state_dir=tmp_path, etcd_members=2))
    with pytest.raises(stack.StackError, match="is not host:port"):
        stack.plan(stack.StackConfig(state_dir=tmp_path, etcd="10.0.0.1"))
