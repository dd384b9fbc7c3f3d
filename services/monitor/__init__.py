"""skyfuse monitor."""
