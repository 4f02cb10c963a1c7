"""Braid's storage and retrieval layer: collections, shards, segments and fusion.

Nothing in this package knows about gRPC or the wire format; the service layer
converts requests into the plain Python types defined here.
"""
