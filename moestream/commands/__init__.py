"""One module per `moestream` subcommand, imported only when that subcommand runs.

Each module's docstring is its help page's description; it defines `EXAMPLES` (shown after the
options), `add_arguments(parser)` and `run(args)`, which returns an exit code or None for 0."""
