"""The `krona` command (placeholder until the CLI module is written)."""


def main() -> None:
    raise SystemExit("krona: not built yet")
