"""A place index: descriptors of geotagged database images in a search engine, their rows in SQLite.

The package has three layers, each in its own files:

* ``store.py``: the row store: ``places.sqlite`` (images, failed images, the model that made the descriptors), the
  manifest that checksums every file, integrity checks, the writer lock, reading image lists (folders, CSV).
* ``backends/``: where search happens: one interface (``Backend``) and one file per engine (FAISS kinds, Qdrant
  Edge, Qdrant server). Nothing outside this package imports an engine's module.
* ``ops.py`` (build, merge, add, remove, tune) and ``place_index.py`` (``PlaceIndex``: open and search), written
  once against the interface.
"""

from .backends import KINDS, storage_of
from .backends.faiss_kinds import DEFAULT_RERANK, FAISS_FILE, VECTORS_FILE, pca_whitening
from .ops import (
    add,
    build,
    check_snapshot_manifest,
    merge,
    pull,
    relocate,
    remove,
    search_settings,
    snapshot,
    snapshot_manifest,
    store_local_features,
    tune,
)
from .place_index import PlaceIndex, verify_index
from .rows import MAX_K, pack_bits
from .store import (
    DB_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    Match,
    Row,
    _connect,
    _extract_into,
    check_model,
    match_dicts,
    model_record,
    read_manifest,
    read_rows,
    rows_digest,
    update_manifest,
)

__all__ = ["DB_FILE", "DEFAULT_RERANK", "FAISS_FILE", "KINDS", "LOCK_FILE", "MANIFEST_FILE", "MAX_K", "VECTORS_FILE",
           "Match", "PlaceIndex", "Row", "_connect", "_extract_into", "add", "build", "check_model",
           "check_snapshot_manifest", "match_dicts",
           "merge", "model_record", "pack_bits", "pca_whitening", "pull", "read_manifest", "read_rows", "relocate",
           "remove",
           "rows_digest", "search_settings", "snapshot", "snapshot_manifest", "storage_of",
           "store_local_features", "tune",
           "update_manifest",
           "verify_index"]
