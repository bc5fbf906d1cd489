"""User-facing utilities (menos-demo)."""
