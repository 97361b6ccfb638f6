"""qpexp's own warning class (standard library only, so that the core can use it)."""


class QpexpWarning(UserWarning):
    """Every warning qpexp itself issues (a fallback, a damaged cache entry, a logger gone offline):
    the test suite turns them into errors (``pyproject.toml``), so a silent fallback fails a test
    unless the test expects it with ``pytest.warns``."""
