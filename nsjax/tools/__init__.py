"""Command-line tools: checkpoint conversion, model table."""
