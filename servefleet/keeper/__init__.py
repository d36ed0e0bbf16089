"""servefleet.keeper."""
