"""How functions meet the bus: per-cloud native event shapes and the local function host."""
