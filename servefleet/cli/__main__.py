"""`python -m servefleet.cli` is the same as `servefleet`."""

from servefleet.cli.main import main

main()
