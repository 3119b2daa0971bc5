import sys

from lathe.cli import main

# Guarded: DCP's process-based async save spawns a helper that re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
