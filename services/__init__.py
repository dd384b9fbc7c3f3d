"""One folder per skyfuse function: a cloud-neutral `handler.py` and thin per-cloud entry points."""
