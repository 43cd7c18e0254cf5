"""Exceptions raised by cellvec.

Every message names the object, the bad value and the fix. The CLI turns any
`CellvecError` into a one-line error in one place (`cellvec.cli`).
"""

from __future__ import annotations


class CellvecError(Exception):
    """Base class for every error cellvec raises on purpose."""


class InputFormatError(CellvecError):
    """A file is not in the format it claims to be (not gene_info, bad h5ad, ...)."""


class EmbedderError(CellvecError):
    """An embedding model cannot be found, loaded or reached."""


class StoreError(CellvecError):
    """The gene store or an atlas table is missing, incomplete or made differently."""


class RecipeMismatchError(StoreError):
    """A query would be embedded with settings other than the atlas was built with."""


class GeneMatchError(CellvecError):
    """Too few of a dataset's genes are found in the gene store."""


class UntrustedInputError(InputFormatError):
    """A file or body from elsewhere that would read other files or decode past its budget."""
