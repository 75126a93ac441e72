"""Downstream integrity tools: capture what the agent publishes, verify it offline (docs/integrity.md)."""
