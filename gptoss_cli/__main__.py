import sys

from gptoss_cli.main import main

sys.exit(main())
