"""Task accuracy through lm-evaluation-harness, for a model and its reference, with recovery.

`scoutq eval MODEL --tasks T1,T2 --reference REF` runs the harness on MODEL, then on REF (one
resident model at a time), and reports per task and metric the value with its standard error,
the reference's, and the recovery ratio (the model's score over the reference's, as AutoRound
and llm-compressor publish it; for lower-is-better metrics such as perplexity, the reference's
over the model's, so 100% always means "nothing lost") with a 95% interval.

The interval pairs the two runs document by document where the harness logged per-document
scores (every mean-aggregated metric: accuracy, exact match): for R = mean(c) / mean(r) over
the same n documents, var(R) ~ var(c_i - R r_i) / (n mean(r)^2) (the delta method for a ratio
of paired means). Pairing matters: both models miss the same hard questions, so the ratio is
far tighter than the two standard errors suggest. Corpus-level metrics (perplexities) have no
per-document score and get no interval.

Tasks are found in scoutq's shipped offline tasks (tasks/) and in the harness's own registry.
A task whose data must come from the Hugging Face hub, when the hub cannot be reached, fails
with one line that names the offline choices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from scoutq.errors import ScoutqError, one_line
from scoutq.evaluate.metrics import Z95

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_TASKS = ("scoutq_pydoc_cloze", "scoutq_pydoc_next_word", "scoutq_pydoc_rolling")
OFFLINE_GROUP = "scoutq_offline"
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


@dataclass(frozen=True)
class ModelSettings:
    """How the harness's scoutq model is built (the `--model_args` of `lm_eval --model scoutq`)."""

    dtype: str = "fp32"
    backend: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    max_length: int | None = None

    def model_args(self, path: Path) -> dict[str, Any]:
        args: dict[str, Any] = {"pretrained": str(path), "dtype": self.dtype, "device": self.device,
                                "batch_size": self.batch_size}
        if self.backend:
            args["backend"] = self.backend
        if self.max_length:
            args["max_length"] = self.max_length
        return args


def offline_hint() -> str:
    return (f"offline choices: {', '.join(OFFLINE_TASKS)} (or the group {OFFLINE_GROUP}); `scoutq tasks` lists them")


@lru_cache(maxsize=1)
def task_manager() -> Any:
    """The harness's task index plus scoutq's tasks (built once per process: it reads every
    task YAML the harness ships, which takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hugging Face hub's host be opened?"""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def use_cache_only() -> None:
    """Hub downloads off for this process: cached datasets still load, missing ones fail at once
    (instead of five retries per file)."""
    import datasets
    from huggingface_hub import constants

    datasets.config.HF_HUB_OFFLINE = True
    constants.HF_HUB_OFFLINE = True


def check_tasks(names: list[str]) -> Any:
    """The harness's task objects for these names, data loaded; one clear line if that fails."""
    from lm_eval.tasks import get_task_dict

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    offline = any(name not in (*OFFLINE_TASKS, OFFLINE_GROUP) for name in names) and not hub_reachable()
    if offline:
        use_cache_only()
    manager = task_manager()
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ScoutqError(f"--tasks: unknown task {', '.join(unknown)}; {offline_hint()}; `lm_eval ls tasks` lists "
                          "the harness's own")
    try:
        return get_task_dict(names, manager)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds when the hub is unreachable
        why = "the Hugging Face hub is not reachable from here and the data is not in the datasets cache" if offline \
            else "tasks other than scoutq's need the Hugging Face hub or its cache"
        raise ScoutqError(f"--tasks {','.join(names)}: cannot load the task data ({one_line(err)}); {why}; "
                          f"{offline_hint()}") from None


def run_harness(path: Path, names: list[str], settings: ModelSettings, limit: int | None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on one model, with per-document samples logged."""
    import lm_eval

    from scoutq.harness.lm import ScoutqLM

    # The harness warns about defaults it fills in (aggregations of the rolling metrics, custom
    # datasets' kwargs) at every task load; scoutq's tasks rely on exactly those defaults.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = ScoutqLM(**settings.model_args(path))
    results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=task_manager(), limit=limit,
                                      log_samples=True, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    if results is None:  # only non-zero ranks get None
        raise ScoutqError("lm-evaluation-harness returned no results")
    results["scoutq_rolling"] = _rolling_token_perplexity(model, results)
    del model
    return results


def _rolling_token_perplexity(model: Any, results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per rolling task, exp(-sum log p / tokens) over its documents: the token perplexity the
    harness's windows give, comparable to `scoutq eval --windows documents`."""
    found: dict[str, dict[str, float]] = {}
    for task, samples in results.get("samples", {}).items():
        if not samples or samples[0].get("arguments") is None:
            continue
        rolling = [s for s in samples if "word_perplexity" in s]
        if len(rolling) != len(samples):
            continue
        total, tokens = 0.0, 0
        for sample in rolling:
            text = sample["arguments"]["gen_args_0"]["arg_0"] if isinstance(sample["arguments"], dict) \
                else sample["arguments"][0][0]
            total += float(sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list)
                           else sample["filtered_resps"])
            tokens += len(model.tok_encode(text, add_special_tokens=False))
        found[task] = {"token_perplexity": math.exp(-total / tokens), "tokens": tokens, "documents": len(rolling)}
    return found


def _metrics(results: dict[str, Any], task: str) -> list[tuple[str, str, float, float | None]]:
    """(metric, filter, value, stderr) of one task's results."""
    rows = []
    for key, value in results["results"].get(task, {}).items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = results["results"][task].get(f"{metric}_stderr,{filter_name}")
        rows.append((metric, filter_name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def _per_document(results: dict[str, Any], task: str, metric: str) -> dict[int, float]:
    scores = {}
    for sample in results.get("samples", {}).get(task, []):
        value = sample.get(metric)
        if isinstance(value, (int, float, bool)):
            scores[int(sample["doc_id"])] = float(value)
    return scores


def recovery(value: float, reference: float, lower_is_better: bool) -> float | None:
    if lower_is_better:
        return reference / value if value else None
    return value / reference if reference else None


def paired_ratio_interval(model: dict[int, float], reference: dict[int, float]) -> tuple[float, float] | None:
    """95% interval of mean(model) / mean(reference) over the documents both scored."""
    shared = sorted(set(model) & set(reference))
    n = len(shared)
    if n < 2:
        return None
    c = [model[i] for i in shared]
    r = [reference[i] for i in shared]
    mean_r = sum(r) / n
    if mean_r == 0:
        return None
    ratio = (sum(c) / n) / mean_r
    residuals = [ci - ratio * ri for ci, ri in zip(c, r, strict=True)]
    mean_residual = sum(residuals) / n
    variance = sum((e - mean_residual) ** 2 for e in residuals) / (n - 1) / (n * mean_r**2)
    half = Z95 * math.sqrt(variance)
    return ratio - half, ratio + half


def task_rows(results: dict[str, Any], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per task, metric and filter, with the reference's value and the recovery."""
    rows: list[dict[str, Any]] = []
    for task in sorted(results["results"]):
        if task in results.get("groups", {}) and not _metrics(results, task):
            continue
        shots = results.get("n-shot", {}).get(task)
        for metric, filter_name, value, stderr in _metrics(results, task):
            lower = any(word in metric for word in LOWER_IS_BETTER)
            higher = results.get("higher_is_better", {}).get(task, {}).get(metric)
            lower = (not higher) if isinstance(higher, bool) else lower
            row: dict[str, Any] = {"task": task, "metric": metric, "filter": filter_name, "n_shot": shots,
                                   "higher_is_better": not lower,
                                   "samples": len(results.get("samples", {}).get(task, [])),
                                   "value": value, "stderr": stderr, "reference": None, "reference_stderr": None,
                                   "recovery": None, "recovery_low": None, "recovery_high": None}
            if reference is not None:
                theirs = {(m, f): (v, s) for m, f, v, s in _metrics(reference, task)}
                if (metric, filter_name) in theirs:
                    ref_value, ref_stderr = theirs[(metric, filter_name)]
                    row.update(reference=ref_value, reference_stderr=ref_stderr,
                               recovery=recovery(value, ref_value, lower))
                    ours, base = _per_document(results, task, metric), _per_document(reference, task, metric)
                    interval = paired_ratio_interval(base, ours) if lower else paired_ratio_interval(ours, base)
                    if interval is not None and row["recovery"] is not None:
                        row.update(recovery_low=interval[0], recovery_high=interval[1])
            rows.append(row)
    return rows


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate_tasks(model: Path, reference: Path | None, names: list[str], settings: ModelSettings,
                   limit: int | None) -> dict[str, Any]:
    """The report's `tasks` section: rows, rolling token perplexities, harness version, limit.

    Call `check_tasks(names)` first (the CLI does, before any model loads)."""
    ours = run_harness(model, names, settings, limit)
    theirs = run_harness(reference, names, settings, limit) if reference is not None else None
    return {
        "harness": f"lm-evaluation-harness {harness_version()}",
        "tasks": names,
        "limit": limit,
        "rows": task_rows(ours, theirs),
        "rolling": ours["scoutq_rolling"],
        "reference_rolling": theirs["scoutq_rolling"] if theirs is not None else None,
    }
