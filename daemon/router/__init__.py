"""`kvferry router`: one OpenAI-compatible entry point in front of any number of decode daemons.

Life of a request through the router:

1. **In.** `app.py` reads the body (size and time limits) and hands it to the forwarder.
2. **Picked.** `forward.py` asks the pool (`pool.py`) for the least-loaded usable target: the
   fewest requests in flight (its last /status, moved by this router's own count since), then
   the most free KV pages (`targets.py`).
3. **Sent.** The body goes to that decode daemon over a pooled connection (aiohttp).
4. **Checked before the first byte.** A whole answer is read in full; a stream up to its first
   event. A failure up to here (no connection, connection lost, 500/502/503, or a stream whose
   first event is such an error) backs the target off and goes back to 2 on another target,
   within `attempts` and `request_timeout_s`; the error then names every attempt.
5. **Answered.** The answer goes to the client; a stream's events are passed on as they arrive.
   Nothing is retried once a byte has gone out: a stream that breaks later ends with an error
   event.
6. **Counted.** `metrics.py` counts the attempt and the answer; the target's count of requests
   in flight drops, and a retired target leaves the pool with its last request.

Meanwhile `watcher.py` reads each target's /health and /status and re-resolves DNS names
(`resolver.py`); `server.py` runs it all on uvicorn in one event loop.
"""
