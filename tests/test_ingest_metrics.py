import socket
import urllib.request

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.metrics import metrics_exporter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lvmae_ingest") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_ingest_serves_its_figures_for_prometheus(sample_videos, tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"")
    srcs = [str(sample_videos["bikes"]), str(sample_videos["carphone_pristine"]), str(tmp_path / "bad.mp4")]
    port = free_port()
    on_progress = metrics_exporter(port)
    cfg = IngestConfig(clip=ClipSpec(num_frames=32, size=32), shard_clips=4)
    summary = ingest_clips(srcs, str(tmp_path / "ds"), cfg, progress=False, on_progress=on_progress)
    m = scrape(port)
    assert m["lvmae_ingest_clips_total"] == summary.samples_written == 10  # 7 + 3 clips
    assert m['lvmae_ingest_files_total{status="ok"}'] == 2
    assert m['lvmae_ingest_files_total{status="bad"}'] == 1
    assert m["lvmae_ingest_written_bytes_total"] > 0
    assert m["lvmae_ingest_clip_errors_total"] == 0
    assert listen_addresses(port) == {"127.0.0.1"}, "the exporter must bind loopback unless told otherwise"


def listen_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found
