"""The `servefleet` command line."""
