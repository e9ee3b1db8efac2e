"""The on-device enrollment store: its file format (format.py), class labels (labels.py) and the store
itself (enrollments.py: open, lock, change, save)."""

from edgemeta.runtime.heads.common import MAX_ADAPT_STEPS, check_adapt  # a store's adaptation setting
from edgemeta.runtime.store.enrollments import EnrollmentStore
from edgemeta.runtime.store.format import (
    LOCK_FILE,
    STORE_FILE,
    TMP_NAME,
    StoreFile,
    read_store,
    sample_ids,
)
from edgemeta.runtime.store.labels import MAX_LABEL, check_label

__all__ = ["LOCK_FILE", "MAX_ADAPT_STEPS", "MAX_LABEL", "STORE_FILE", "TMP_NAME", "EnrollmentStore", "StoreFile",
           "check_adapt", "check_label", "read_store", "sample_ids"]
