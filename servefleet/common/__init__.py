"""Plumbing shared by every servefleet service: errors, config, logging, telemetry, gRPC server."""
