"""skyfuse deployer."""
