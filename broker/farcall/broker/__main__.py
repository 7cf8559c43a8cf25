"""``python -m farcall.broker`` is ``farcall-broker``."""

import sys

from farcall.broker.cli import main

sys.exit(main())
