"""The application behind the ``trustrepair`` command: settings, the run directory and its stages, model
loading (the offline default model), SFT, the prefix hidden-state cache, the report and the CLI. Nothing
outside this package imports it."""
