"""The `clara` command line."""

__all__: list[str] = []
