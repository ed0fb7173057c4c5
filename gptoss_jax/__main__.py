import sys

from gptoss_jax.cli import main

sys.exit(main())
