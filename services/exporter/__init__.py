"""skyfuse exporter."""
