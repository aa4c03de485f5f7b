"""Local training engines and evaluation."""
