"""``python -m train CONFIG [overrides]``."""
import sys

from train.cli import main

sys.exit(main())
