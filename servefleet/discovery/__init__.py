"""servefleet.discovery."""
