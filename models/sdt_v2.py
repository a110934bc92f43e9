"""Placeholder: being written (issue #11)."""
