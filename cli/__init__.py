"""The `srvit` command: a thin layer above the packages, one module per subcommand, each imported only when chosen."""
