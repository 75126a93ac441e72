"""cleanroom-edge agent runtime: config, scheduler, buffer, forwarder, inference, CLI."""

__version__ = "0.1.0"
