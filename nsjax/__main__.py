"""`python -m nsjax ...` is the `nsjax` command (see nsjax.cli)."""
import sys

from nsjax import cli

sys.exit(cli.main())
