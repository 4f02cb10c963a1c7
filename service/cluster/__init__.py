"""Cluster mode: router, shard servers and their NATS JetStream plumbing."""
