"""The `pangu` command (import name pangu_tools)."""
