"""`python -m lvmae_cli ...` is `lvmae ...` (what launchers start in each rank)."""

import sys

from lvmae_cli.main import main

sys.exit(main())
