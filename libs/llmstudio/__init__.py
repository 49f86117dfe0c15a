"""LLM Studio: the shared kernel (config, bus, events, storage, telemetry, auth), SDK and CLI."""

__version__ = "0.1.0"
