"""skyfuse router."""
