"""Training: the run composed top to bottom, the loop, the run log."""
