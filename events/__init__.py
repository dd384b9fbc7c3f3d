"""The event contracts as data (catalog.toml, schemas/, samples/): imported as `skyfuse._events`
(pyproject.toml maps this folder into the package), which is how `skyfuse.contracts` finds it,
in a checkout and in an installed wheel alike."""
