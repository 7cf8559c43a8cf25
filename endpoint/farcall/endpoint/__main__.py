"""``python -m farcall.endpoint``: the same as ``farcall-endpoint``."""

import sys

from farcall.endpoint.cli import main

sys.exit(main())
