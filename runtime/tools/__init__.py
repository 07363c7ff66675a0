"""Measuring tools over the engine: ``compare`` (batching strategies), ``loadgen`` (online load against
any OpenAI-compatible server), ``simulator`` (the engine on simulated time) and ``driver`` (the one
loop that pushes a workload through an engine)."""
