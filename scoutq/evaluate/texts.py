"""Which text an evaluation reads.

* `builtin`: the offline corpus's evaluation split (held out from the fixtures' training and
  calibration text).
* `wikitext2`: WikiText-2's *test* split through `datasets` (the field's perplexity set; needs
  the hub, and says so in one line when it is not reachable).
* any other calibration set name (c4, pile-val) or YAML path, or a .txt/.jsonl/.parquet file.
"""

from __future__ import annotations

from scoutq.data.sets import load_calibration_set, read_documents


def evaluation_texts(dataset: str) -> tuple[str, list[str] | None]:
    """(description, documents); documents None means the builtin evaluation split."""
    if dataset == "builtin":
        return "builtin (evaluation split)", None
    if dataset == "wikitext2":
        cset = load_calibration_set("wikitext2").model_copy(update={"split": "test"})
        return "wikitext2 (test split)", read_documents(cset)
    cset = load_calibration_set(dataset)
    return cset.name, read_documents(cset)
