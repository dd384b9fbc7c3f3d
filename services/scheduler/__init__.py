"""skyfuse scheduler."""
