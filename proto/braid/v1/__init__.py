"""Generated protobuf and gRPC code of the braid.v1 wire contract (built by the install step)."""
