"""The ``gptoss-jax`` command line, on top of the library (``gptoss_jax``) and the apps (``convert``,
``train``): :mod:`gptoss_cli.main` dispatches to their subcommand modules; :mod:`gptoss_cli.demo`
combines them (random checkpoint -> convert -> generate/serve)."""
