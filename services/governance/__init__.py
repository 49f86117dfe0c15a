"""Governance: API keys and roles, and the tamper-evident audit log of every domain event."""
