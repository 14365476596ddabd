"""Corpus -> clip shards -> token store (see issue: lvmae ingest)."""
