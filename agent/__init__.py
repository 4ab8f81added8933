"""omaha-agent: an A/B update agent for embedded and edge Linux devices."""
__version__ = "0.1.0"
