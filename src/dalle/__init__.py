"""dalle: the command-line application."""
