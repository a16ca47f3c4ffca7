"""One rank's serving engine, no processes, no HTTP: sequences, KV pages, schedulers,
sampler, runner, the prefill and decode engines, the TP group, the engine's outputs."""
