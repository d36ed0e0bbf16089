"""servefleet.broker."""
