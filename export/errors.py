"""The one exception export raises for anything the user can fix: the CLI turns it into exit code 2."""


class ExportError(RuntimeError):
    pass
