import sys

from lathe.cli import main

sys.exit(main())
