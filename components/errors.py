"""Errors that name a bad input and its fix, free of ML imports: the CLI catches them before it imports any ML library.

`components.data` raises `DatasetValidationError` (and still exports it); it lives here so that catching it, as the
CLI does around every run, does not import `datasets` and numpy.
"""


class DatasetValidationError(ValueError):
    """A dataset that cannot be used as given; the message names the dataset, the field and the fix."""
