"""`python -m tkg.server` = `tkg serve`."""

import sys

from tkg.server.cli import main

sys.exit(main())
