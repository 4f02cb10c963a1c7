"""The gRPC service: request validation, conversion, error mapping, server and CLI."""
