import sys

from fluxray.cli import main

sys.exit(main())
