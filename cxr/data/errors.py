"""The one error every data module raises for a dataset cxr cannot use."""


class DataError(Exception):
    """Unusable dataset (missing folder, no images, one class, a bad table cell): reported as one line."""
