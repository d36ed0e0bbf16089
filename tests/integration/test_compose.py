"""docker-compose.yml cannot run here (no Docker engine); check that it parses and that every
servefleet command it runs exists and accepts its flags."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"etcd", "redis", "ray-head", "discovery", "keeper", "broker", "cluster-agent", "autoscaler"}


def test_compose_services_and_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == EXPECTED
    checked = 0
    for name, service in services.items():
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            module = importlib.import_module(f"{command[2]}.__main__")
            args = module.parser().parse_args(command[3:])  # SystemExit on an unknown flag
            assert args.listen.startswith("0.0.0.0:"), name
            checked += 1
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert checked == 5
    assert (ROOT / "Dockerfile").exists()
