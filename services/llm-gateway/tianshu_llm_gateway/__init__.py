"""The Tianshu LLM gateway service: answers the model calls workflows send over NATS JetStream."""
