"""skyfuse trainer."""
