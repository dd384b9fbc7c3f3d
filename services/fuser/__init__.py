"""skyfuse fuser."""
