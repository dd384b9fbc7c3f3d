"""The whole fleet on one machine: development and demo tooling, never imported by a deployed
function (each cloud runs its own triggers, servers and schedulers).

- `skyfuse.dev.entrypoints`: the functions' entry points, as the project declares them
  (`[project.entry-points."skyfuse.functions"]` in pyproject.toml); the only way in to `services`.
- `skyfuse.dev.fleet`: a function host per (cloud, function) behind that cloud's native trigger,
  the timers, and the threads they run in.
- `skyfuse.dev.hosts`: each cloud's inference entry point behind its real HTTP server on 127.0.0.1;
  `skyfuse.dev.launch`: how those servers start (imports with the garbage collector off).
- `skyfuse.dev.router`: the local fleet's front door, forwarding to the placed clouds by weight.
- `skyfuse.dev.local`: all of it as one fleet (`skyfuse up`), `.skyfuse/endpoints.json`, the local API key.
- `skyfuse.dev.emulation`: the same fleet on Kafka and the cloud emulators (`--emulate`).
- `skyfuse.dev.runs`: a training run on the local fleet (`skyfuse train`, `skyfuse demo`);
  `skyfuse.dev.scenarios`: the design's worked example and its load step.

Import the submodule you need; this package imports nothing.
"""
