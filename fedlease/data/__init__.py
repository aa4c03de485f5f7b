"""Data sources, partitioners and the data stage."""
