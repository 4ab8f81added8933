"""Development tools (the development Omaha server, the demo): never imported by the daemon."""
