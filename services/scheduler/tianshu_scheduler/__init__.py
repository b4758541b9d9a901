"""The Tianshu scheduler service: runs cases, starting, waking and resuming them from NATS."""
