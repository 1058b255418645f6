"""Stages that score or drop samples: one stage per file, registered on import."""
