"""Loss functions and multi-task loss weighting strategies."""
