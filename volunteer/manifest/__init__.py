"""Experiment manifest: YAML schema, strict loading, errors naming file and key path."""
