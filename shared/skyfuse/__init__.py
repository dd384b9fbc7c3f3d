"""skyfuse: train where the data lives, fuse the sub-models, serve from the best cloud."""

__version__ = "0.1.0"
