"""`scoutq eval CAND1 CAND2 ... --reference REF`: candidates side by side on the same windows.

One candidate and the reference are resident at a time (the reference is loaded once and kept;
each candidate is loaded, compared and dropped), so memory is that of a single-model eval plus
one model.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch

from scoutq.checkpoint.gguf_file import is_gguf
from scoutq.checkpoint.lock import output_lock
from scoutq.checkpoint.reader import require_directory
from scoutq.checkpoint.writer import atomic_write_bytes, atomic_write_json
from scoutq.cli._output import console, result_json, step_progress_plain, table
from scoutq.errors import ScoutqError
from scoutq.stream.processes import resolve_device

def judge_candidates(models: list[Path], reference: Path, dataset: str, seq_len: int, samples: int | None,
                     windows: str, backend: str | None, dtype: str, batch_size: int, device: str,
                     json: Path | None, markdown: Path | None) -> None:
    from scoutq import __version__
    from scoutq.cli.evaluation import DTYPES
    from scoutq.evaluate.candidates import (
        candidate_table,
        candidates_report,
        describe_candidate,
        pairwise_kl,
        pairwise_rows,
        render_candidates_markdown,
    )
    from scoutq.evaluate.compare import compare_models
    from scoutq.evaluate.report import build_report
    from scoutq.evaluate.texts import evaluation_texts
    from scoutq.evaluate.windows import token_windows
    from scoutq.model.load import load_model

    started = time.perf_counter()
    for path in models:
        if not is_gguf(path):
            require_directory(path, "a checkpoint directory or a .gguf file")
    if len({path.resolve() for path in models}) != len(models):
        raise ScoutqError("the same candidate is named twice")
    if not is_gguf(reference):
        require_directory(reference, "a reference checkpoint directory or .gguf file")
    # (format, bytes) of each; a format scoutq cannot read fails here, before any work
    described = [describe_candidate(path) for path in models]
    with ExitStack() as locks:
        for path in (json if json is not None and str(json) != "-" else None, markdown):
            if path is not None:
                locks.enter_context(output_lock(path))
        name, texts = evaluation_texts(dataset)
        chosen_device = resolve_device(device)
        tokens_from = reference if reference.is_dir() else models[0]
        windows_of_tokens, scored = token_windows(windows, tokens_from, seq_len, samples, texts)
        reference_model = load_model(reference, device=chosen_device, dtype=DTYPES[dtype])
        parameters = sum(p.numel() for p in reference_model.parameters())
        environment = {"scoutq": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": str(chosen_device), "dtype": dtype, "backend": backend or "default"}
        reports, comparisons = [], []
        with step_progress_plain() as progress:
            for path, (stored_format, size) in zip(models, described, strict=True):
                task = progress.add_task(f"evaluate {path.name}", total=windows_of_tokens.shape[0])
                candidate = load_model(path, device=chosen_device, dtype=DTYPES[dtype], backend=backend)
                comparison = compare_models(candidate, reference_model, windows_of_tokens, batch_size, scored=scored,
                                            on_batch=lambda done, task=task: progress.update(task, completed=done))
                del candidate
                single = build_report(str(path), str(reference), name, seq_len, comparison, None, None, environment,
                                      0.0, windows)
                single |= {"quantized_format": stored_format, "size_bytes": size,
                           "bits_per_weight": 8.0 * size / parameters}
                reports.append(single)
                comparisons.append(comparison)
        report = candidates_report(reports, pairwise_kl([str(p) for p in models], comparisons))
        report["seconds"] = round(time.perf_counter() - started, 2)

        if markdown is not None:
            atomic_write_bytes(markdown, render_candidates_markdown(report).encode("utf-8"))
        if json is not None and str(json) == "-":
            result_json(report)
            return
        if json is not None:
            atomic_write_json(json, report)
        header, rows = candidate_table(report)
        table(f"scoutq eval: {len(models)} candidates against {reference}", header, rows)
        table("Pairwise KL difference (paired by window, 95%)", ["pair", "mean KL difference", "verdict"],
              pairwise_rows(report))
        for path, what in ((json, "JSON"), (markdown, "Markdown")):
            if path is not None:
                console.print(f"{what} report: {path}")
