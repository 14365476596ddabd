"""Corpus -> clip shards -> token store: `lvmae ingest clips|tokens|synth` (docs/ingest.md)."""
