"""`scoutq tasks`: the offline lm-evaluation-harness tasks scoutq ships, and where they live."""

from __future__ import annotations

from typing import Annotated

import typer

from scoutq.cli._output import console, table

EXAMPLES = """Examples:

  scoutq tasks

  lm_eval --model scoutq --model_args pretrained=out/tiny-w4,dtype=bf16 --include_path "$(scoutq tasks --path)" --tasks scoutq_offline
"""

DESCRIPTIONS = {
    "scoutq_pydoc_cloze": "multiple choice: which 12-word continuation follows the passage (4 choices, chance 25%)",
    "scoutq_pydoc_next_word": "generation: the passage's next word, greedy, exact match",
    "scoutq_pydoc_rolling": "rolling log-likelihood of whole documents: word / byte perplexity, bits per byte",
}


def tasks(
    path: Annotated[bool, typer.Option(
        "--path", help="Print only the folder to pass to lm_eval --include_path.")] = False,
) -> None:
    """List the offline lm-eval tasks scoutq ships (held-out CPython documentation text).

    `scoutq eval --tasks` finds them by name; `lm_eval` needs `--include_path` with the folder
    this prints. `--model scoutq` itself needs nothing: installing scoutq registers it.
    """
    from scoutq.harness.run import OFFLINE_GROUP, OFFLINE_TASKS, TASKS_DIR

    if path:
        print(TASKS_DIR)
        return
    rows = [[name, DESCRIPTIONS.get(name, "")] for name in OFFLINE_TASKS]
    rows.append([OFFLINE_GROUP, "all of the above"])
    table("Offline lm-eval tasks", ["task", "what it scores"], rows)
    console.print(f"folder (lm_eval --include_path): {TASKS_DIR}")
