"""`python -m verispec ...` is `verispec ...`."""

import sys

from verispec.cli import main

sys.exit(main())
