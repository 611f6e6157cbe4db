"""Task towers: map a backbone's ``[B, F]`` features to one logit per task."""
