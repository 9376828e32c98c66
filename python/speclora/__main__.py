import sys

from speclora.cli import main

sys.exit(main())
