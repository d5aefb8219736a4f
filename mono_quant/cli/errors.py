"""The command line's one error of its own: bad usage found after parsing (exit code 2)."""


class UsageError(Exception):
    """Bad command-line usage found after parsing (exit code 2).

    Example:
        >>> str(UsageError("--output is the input file"))
        '--output is the input file'
    """
