"""Bulk indexing jobs: ``braid job index`` and what it is made of.

- corpus.py: reading a corpus (Braid JSONL, BEIR corpus.jsonl, Parquet; paths or globs),
  its fingerprint, and the stable split of documents into partitions;
- encode.py: the worker processes that turn rows into pre-encoded braid.v1 documents with
  the collection's own ONNX models;
- checkpoint.py: progress checkpoints kept in the target Braid itself;
- sender.py: the acknowledged stream to the server, with retries and rejects;
- index_job.py: the job itself: options, the pipeline, the summary and exit codes.
"""
