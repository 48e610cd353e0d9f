"""Errors a user can act on; each message says what to do."""


class ModelError(Exception):
    pass


class ModelNotFoundError(ModelError, ValueError):
    pass


class ModelIntegrityError(ModelError):
    pass


class TokenizerMismatchError(ModelError, ValueError):
    pass
