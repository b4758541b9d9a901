"""The Tianshu tool-runner service: runs the tool calls workflows send over NATS JetStream."""
