"""CLI commands for export and validation (filled in by the exporter)."""


def add_export_commands(sub) -> None:
    pass
