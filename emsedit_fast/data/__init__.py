"""Edit records, loaders, splits, the bundled fact set and tokenisation.

`datasets` is imported only by the `datasets.Dataset` views (it costs about a second), and `transformers` never: the
tokenizer is whatever object the caller passes.
"""

from emsedit_fast.data.collate import IGNORE_INDEX
from emsedit_fast.data.collate import TokenBatch
from emsedit_fast.data.collate import collate
from emsedit_fast.data.collate import edit_tuples
from emsedit_fast.data.collate import equiv_tuples
from emsedit_fast.data.collate import portability_tuples
from emsedit_fast.data.collate import record_tuples
from emsedit_fast.data.collate import tokenize_pair
from emsedit_fast.data.collate import unrel_tuples
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.data.facts import make_counterfacts
from emsedit_fast.data.schemas import FORMATS
from emsedit_fast.data.schemas import KINDS
from emsedit_fast.data.schemas import DataError
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.data.schemas import LoadResult
from emsedit_fast.data.schemas import RecordError
from emsedit_fast.data.schemas import RecordStream
from emsedit_fast.data.schemas import iter_records
from emsedit_fast.data.schemas import load_records
from emsedit_fast.data.schemas import records_to_dataset
from emsedit_fast.data.schemas import save_records
from emsedit_fast.data.splits import RecordSplit
from emsedit_fast.data.splits import batches
from emsedit_fast.data.splits import carve_valid
from emsedit_fast.data.splits import load_split
from emsedit_fast.data.splits import split_records
from emsedit_fast.data.splits import zsre_split

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "KINDS",
    "DataError",
    "EditRecord",
    "LoadResult",
    "RecordError",
    "RecordStream",
    "RecordSplit",
    "TokenBatch",
    "batches",
    "bundled_facts",
    "carve_valid",
    "collate",
    "edit_tuples",
    "equiv_tuples",
    "iter_records",
    "load_records",
    "load_split",
    "make_counterfacts",
    "portability_tuples",
    "record_tuples",
    "records_to_dataset",
    "save_records",
    "split_records",
    "tokenize_pair",
    "unrel_tuples",
    "zsre_split",
]
