"""The command layer: one module per room with that room's `solopo` subcommands (cli.py maps names to them).

Command modules read YAML and overrides into `config.ExperimentConfig`, start the parallel context and call
the rooms; nothing below this package imports it, so a room never depends on how it is invoked.
"""
