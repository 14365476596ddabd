"""The `lvmae` command line: one module per command group, on top of evals/, train/, ingest/ and lvmae/."""
