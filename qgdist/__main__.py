import sys

from qgdist.cli import main

sys.exit(main())
