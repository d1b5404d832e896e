"""Readers of the benchmark datasets in their standard on-disk layouts, one module per dataset family:
:mod:`~e5v.eval.readers.retrieval` (Flickr30K, COCO), :mod:`~e5v.eval.readers.composed` (CIRR, FashionIQ) and
:mod:`~e5v.eval.readers.sts` (STS12-16, STS-B, SICK-R), over :mod:`~e5v.eval.readers.common`.

Each dataset lives in its own folder under the data root (``--data DIR``) and may come in one of two layouts:
the original release files, or a Hugging Face ``datasets`` folder written with ``save_to_disk`` from the
mirrors the official code loads (``royokong/flickr30k_test`` etc.).  Nothing is downloaded.  A missing or
malformed dataset raises :class:`DatasetError`, whose message says which files belong where (:data:`LAYOUTS`).

Images are never decoded here: readers return paths (or the stored bytes of a ``datasets`` folder) behind a
:class:`Lazy` sequence, and the engine loads and validates each one when it is embedded.
"""
from .common import LAYOUTS, DatasetError, Lazy
from .composed import FASHIONIQ_CATEGORIES, CIRData, CIRQuery, read_cirr, read_fashioniq
from .retrieval import RetrievalData, read_retrieval
from .sts import STS_YEARS, STSData, read_sts

__all__ = ["LAYOUTS", "DatasetError", "Lazy", "FASHIONIQ_CATEGORIES", "CIRData", "CIRQuery", "read_cirr",
           "read_fashioniq", "RetrievalData", "read_retrieval", "STS_YEARS", "STSData", "read_sts"]
