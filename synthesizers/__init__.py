"""Stages that create new samples: one stage per file, registered on import."""
