"""Engine stages (tokenize, pack): one stage per file, registered on import."""
