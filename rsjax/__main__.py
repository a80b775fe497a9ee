import sys

from rsjax.cli import main

sys.exit(main())
