"""The worker: the Faust app composed of its parts, and what keeps it healthy.

``app`` builds the topics, the session table, the plays/signals/control agents and the services
(Redis writer, checkpointer, timers, telemetry); ``watchdog`` detects a stalled loop and measures
loop lag; ``snapshot`` builds checkpoints in a forked child so the event loop is not held.
"""
