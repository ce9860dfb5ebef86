"""Recommendations from trained models: CLI, HTTP, export."""
