"""`python -m ocilayers`."""

import sys

from ocilayers.cli import main

sys.exit(main())
