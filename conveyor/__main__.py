import sys

from conveyor.runtime.cli import main

sys.exit(main())
