"""Prometheus counters for `lvmae ingest clips` (--metrics-port): files probed, clips and bytes written,
clip errors; metrics_exporter serves them and returns the on_progress callback ingest.clips.ingest_clips
feeds."""

from __future__ import annotations


def metrics_exporter(port: int | None, addr: str = "127.0.0.1"):
    """Prometheus counters for the ingest figures, served on addr:port; -> on_progress callback."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()  # private: several ingests in one process must not collide
    files = Counter("lvmae_ingest_files_total", "Source files probed", ["status"], registry=registry)
    clips = Counter("lvmae_ingest_clips_total", "Clips written", registry=registry)
    written = Counter("lvmae_ingest_written_bytes_total", "Clip bytes written", registry=registry)
    errors = Counter(
        "lvmae_ingest_clip_errors_total", "Clips skipped because their source failed", registry=registry
    )
    start_http_server(port, addr=addr, registry=registry)

    def on_progress(metric: str, amount: int) -> None:
        {
            "files_ok": files.labels("ok"),
            "files_bad": files.labels("bad"),
            "clips": clips,
            "bytes": written,
            "clip_errors": errors,
        }[metric].inc(amount)

    return on_progress
