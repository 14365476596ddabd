"""`python -m lvmae_cli ...` is `lvmae ...` (what launchers start in each rank).

It ends through lvmae_cli.main.exit_now: the exit hooks run (a rank's exit mark, its shared-memory buffer
released) and the output is flushed, but the interpreter's teardown of torch, DeepSpeed and the I/O
threads is skipped, 1.4 s per process here (one-off, 2026-12-04: a 1-step `train mae`, 6.9 s against
5.5 s), which every launch waited for once per rank."""

from lvmae_cli.main import exit_now, main

exit_now(main())
