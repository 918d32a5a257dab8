"""`scoutq eval`: perplexity, KL divergence, top-1 and routing agreement, expert error, latency."""

from __future__ import annotations

import json as jsonlib
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from scoutq.checkpoint.gguf_file import is_gguf
from scoutq.checkpoint.lock import output_lock
from scoutq.checkpoint.reader import require_directory
from scoutq.checkpoint.writer import atomic_write_bytes, atomic_write_json
from scoutq.cli._output import console, error_console, result_json, step_progress_plain, table
from scoutq.errors import ScoutqError
from scoutq.stream.processes import resolve_device

EXAMPLES = """Examples:

  scoutq eval out/scout-w4 --reference ./Llama-4-Scout-17B-16E-Instruct --dataset wikitext2

  scoutq eval out/tiny-w4 --reference out/tiny-trained --latency --json report.json --markdown report.md --plots plots/

  scoutq eval out/tiny-trained --dataset notes.txt --seq-len 256 --samples 64

  scoutq eval ./scout --layer-walk --samples 32 --save-reference scout-ref.safetensors

  scoutq eval out/scout-w4 --layer-walk --reference scout-ref.safetensors

  scoutq eval out/tiny-q4_0.gguf --reference out/tiny-trained --json gguf-report.json

  scoutq eval out/tiny-w4 --reference out/tiny-trained --tasks scoutq_offline --markdown tasks.md

  scoutq eval out/scout-w4 --reference ./Llama-4-Scout-17B-16E-Instruct --tasks arc_easy,hellaswag --limit 500

  scoutq eval out/tiny-trained --windows documents --seq-len 2049

  scoutq eval out/tiny-w4 out/llmc-gptq out/tiny-gptq-format out/tiny-bnb-nf4 --reference out/tiny-trained --markdown judged.md
"""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eval_command(
    models: Annotated[list[Path], typer.Argument(
        metavar="MODEL",
        help="Checkpoint(s) to evaluate: scoutq's, another tool's (compressed-tensors, GPTQ, AWQ, bitsandbytes), "
             "bf16, or a .gguf file. Several: judged side by side on the same windows (needs --reference).")],
    reference: Annotated[Path | None, typer.Option(
        help="Reference checkpoint (usually the bf16 source), or a .gguf file.")] = None,
    dataset: Annotated[str, typer.Option(
        help="builtin (offline held-out text), wikitext2 (test split, needs the hub), a calibration set name, "
             "or a .txt/.jsonl/.parquet file.")] = "builtin",
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.", min=2)] = 128,
    samples: Annotated[int | None, typer.Option(help="Windows to evaluate (default: all the text gives).", min=1)] = None,
    latency: Annotated[bool, typer.Option(help="Also measure prefill / decode speed and memory.")] = False,
    json: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here ('-' for stdout).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown report here.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Write PNG heatmaps and the routing histogram into this folder.")] = None,
    backend: Annotated[str | None, typer.Option(help="Kernel backend for quantized weights: reference, cpu, bnb, cuda (default: cuda on GPUs, cpu on CPUs).")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32 (exact comparisons) or bf16 (faster).")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 8,
    layer_walk: Annotated[bool, typer.Option(
        help="Walk the checkpoints layer by layer instead of loading them (models larger than memory).")] = False,
    top_k: Annotated[int, typer.Option(help="Reference log-probabilities kept per token in --layer-walk mode.",
                                       min=1)] = 64,
    device: Annotated[str, typer.Option(
        help="Where the models compute: cpu, cuda or auto (cuda when visible).")] = "cpu",
    save_reference: Annotated[Path | None, typer.Option(
        help="--layer-walk: store the reference's (or, without --reference, this model's) top-k "
             "log-probabilities here, for `--reference FILE` in later runs.")] = None,
    windows: Annotated[str, typer.Option(
        help="stream: one stream of all documents in non-overlapping windows; documents: each document "
             "alone, every token scored once, in lm-eval's rolling windows (max_length = seq-len - 1).")] = "stream",
    tasks: Annotated[str | None, typer.Option(
        help="lm-evaluation-harness tasks to run too, comma-separated (scoutq_offline: the shipped offline "
             "tasks; `scoutq tasks` lists them); on the reference as well when given.")] = None,
    limit: Annotated[int | None, typer.Option(help="--tasks: documents per task (default: all).", min=1)] = None,
) -> None:
    """Evaluate a model on held-out text, against a reference model when given.

    Reports perplexity with a 95% interval; against the reference, the KL divergence of the
    next-token distributions (mean with interval, p99), top-1 agreement and, per MoE layer,
    the share of tokens routed to the same expert; per layer and expert, weight and output
    SQNR; with --latency, prefill and decode tokens/s, time to first token and peak memory.
    With several models, each is judged against --reference on the same windows, side by side,
    with the KL difference between every pair and its paired interval.
    """
    from scoutq.evaluate.compare import compare_models
    from scoutq.evaluate.quant_error import error_tables
    from scoutq.evaluate.report import (
        TASK_COLUMNS,
        build_report,
        render_markdown,
        rolling_rows,
        routing_rows,
        summary_rows,
        task_table,
    )
    from scoutq.evaluate.texts import evaluation_texts
    from scoutq.evaluate.windows import WINDOWINGS, token_windows
    from scoutq.model.load import load_model

    if dtype not in DTYPES:
        raise ScoutqError(f"--dtype {dtype!r}: choose fp32 or bf16")
    if windows not in WINDOWINGS:
        raise ScoutqError(f"--windows {windows!r}: choose stream or documents")
    if len(models) > 1:
        from scoutq.cli.judge import judge_candidates

        refused = [option for option, given in (("--layer-walk", layer_walk), ("--latency", latency),
                                                ("--tasks", tasks is not None), ("--plots", plots is not None),
                                                ("--save-reference", save_reference is not None)) if given]
        if refused:
            raise ScoutqError(f"{refused[0]} runs with one model; evaluate the candidates one at a time for it")
        if reference is None:
            raise ScoutqError("several models are judged against a reference: add --reference (the bf16 checkpoint)")
        judge_candidates(models, reference, dataset, seq_len, samples, windows, backend, dtype, batch_size, device,
                         json, markdown)
        return
    model = models[0]
    started = time.perf_counter()
    model_gguf = is_gguf(model)
    if not model_gguf:
        require_directory(model, "a checkpoint directory or a .gguf file")
    reference_gguf = reference is not None and is_gguf(reference)
    stored_reference = reference is not None and reference.is_file() and not reference_gguf
    if reference is not None and not stored_reference and not reference_gguf:
        require_directory(reference, "a reference checkpoint directory, .gguf file or stored reference file")
    if layer_walk and (model_gguf or reference_gguf):
        raise ScoutqError("--layer-walk reads safetensors checkpoints; a GGUF file is evaluated resident (drop --layer-walk)")
    if stored_reference and not layer_walk:
        raise ScoutqError(f"--reference {reference}: a stored reference file is used with --layer-walk")
    if layer_walk and latency:
        raise ScoutqError("--latency measures the resident runtime; it cannot be combined with --layer-walk")
    if save_reference is not None and not layer_walk:
        raise ScoutqError("--save-reference stores layer-walked scores; add --layer-walk")
    if layer_walk and (tasks or windows != "stream"):
        raise ScoutqError("--tasks and --windows documents run the resident model; drop --layer-walk")
    if limit is not None and not tasks:
        raise ScoutqError("--limit applies to --tasks; add --tasks")
    task_names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if tasks is not None and not task_names:
        raise ScoutqError("--tasks: give at least one task name (scoutq_offline runs the shipped offline tasks)")
    if task_names:
        from scoutq.harness.run import check_tasks

        check_tasks(task_names)  # before any model loads: an unknown or unreachable task fails at once
    # One run per report: a second eval writing the same files is refused at once, naming this one.
    with ExitStack() as locks:
        for path in (json if json is not None and str(json) != "-" else None, markdown, plots, save_reference):
            if path is not None:
                locks.enter_context(output_lock(path))
        name, texts = evaluation_texts(dataset)
        chosen_device = resolve_device(device)

        errors, latency_report = None, None
        if layer_walk:
            comparison = _walked(model, reference, stored_reference, name, texts, seq_len, samples, top_k,
                                 save_reference, chosen_device)
        else:
            # A GGUF model beside a checkpoint reference is scored on the reference's own tokens (the
            # embedded vocabulary is the same; tests/gguf_files check that it tokenizes the same).
            tokens_from = reference if model_gguf and reference is not None and reference.is_dir() else model
            windows_of_tokens, scored = token_windows(windows, tokens_from, seq_len, samples, texts)
            candidate = load_model(model, device=chosen_device, dtype=DTYPES[dtype], backend=backend)
            reference_model = load_model(reference, device=chosen_device, dtype=DTYPES[dtype]) \
                if reference is not None \
                else None
            with step_progress_plain() as progress:
                task = progress.add_task("evaluate", total=windows_of_tokens.shape[0])
                comparison = compare_models(candidate, reference_model, windows_of_tokens, batch_size,
                                            on_batch=lambda done: progress.update(task, completed=done), scored=scored)
            del reference_model
            if (reference is not None and model.is_dir() and reference.is_dir()
                    and "quantization_config" in jsonlib.loads((model / "config.json").read_text())):
                errors = error_tables(model, reference, windows_of_tokens, device=chosen_device)
            if latency:
                from scoutq.evaluate.latency import measure_latency
                from scoutq.model.quantized import kernels_used

                # Speed is measured as the runtime is used: bf16 activations, whatever --dtype the
                # quality comparison ran in (the packed CPU kernels are 5-30x slower in fp32).
                del candidate
                runtime = load_model(model, device=chosen_device, dtype=torch.bfloat16, backend=backend)
                latency_report = measure_latency(runtime, runtime.config.vocab_size).to_json()
                latency_report["kernels"] = kernels_used(runtime)  # which kernels ran, with their calls
                del runtime
            else:
                del candidate
        task_report = None
        if task_names:
            from scoutq.harness.run import ModelSettings, evaluate_tasks

            # One resident model at a time: the comparison's are gone; the harness loads each in turn.
            settings = ModelSettings(dtype=dtype, backend=backend, device=device, batch_size=batch_size,
                                     max_length=seq_len - 1 if windows == "documents" else None)
            task_report = evaluate_tasks(model, reference, task_names, settings, limit)
        environment = {"scoutq": _version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": str(chosen_device), "dtype": "fp32" if layer_walk else dtype,
                       "backend": "layer-walk (dequantized, fp32)" if layer_walk else backend or "default"}
        report = build_report(str(model), str(reference) if reference else None, name, seq_len, comparison, errors,
                              latency_report, environment, round(time.perf_counter() - started, 2), windows,
                              task_report)

        if plots is not None:
            _write_plots(report, plots)
        if markdown is not None:
            _write_text(markdown, render_markdown(report))
        if json is not None and str(json) != "-":
            atomic_write_json(json, report)
        if json is not None and str(json) == "-":
            result_json(report)
            return
        table(f"scoutq eval: {model}", ["metric", "value"], [list(row) for row in summary_rows(report)])
        if report["tasks"]:
            table(f"Tasks ({report['tasks']['harness']})", TASK_COLUMNS, task_table(report))
            if report["tasks"]["rolling"]:
                table("Rolling tasks: token perplexity in the harness's windows",
                      ["task", "token perplexity", "reference", "tokens"], rolling_rows(report))
        if report["routing"]:
            table("Routing per MoE layer",
                  ["layer", "same expert as reference", "least-used expert", "most-used expert"],
                  routing_rows(report))
        for path, what in ((json, "JSON"), (markdown, "Markdown"), (plots, "plots")):
            if path is not None:
                console.print(f"{what} report: {path}")


def _walked(model: Path, reference: Path | None, stored: bool, dataset: str, texts: list[str] | None, seq_len: int,
            samples: int | None, top_k: int, save_to: Path | None, device: torch.device) -> Any:
    """Layer-walked scores of the reference (walked, or read from a stored file) and the model."""
    from scoutq.checkpoint.config import load_text_config
    from scoutq.evaluate.walked import load_reference, save_reference, walk_scores, walked_comparison
    from scoutq.evaluate.windows import evaluation_windows

    experts = load_text_config(model).num_local_experts
    reference_scores = None
    with step_progress_plain() as progress:
        if stored:
            reference_scores, described = load_reference(reference)  # type: ignore[arg-type]
            if described.get("dataset") != dataset:
                raise ScoutqError(f"--reference {reference}: scored on {described.get('dataset')!r}, not {dataset!r}")
            windows = reference_scores.windows
        else:
            windows = evaluation_windows(model, seq_len, samples, texts)
        if reference is not None and not stored:
            task = progress.add_task(f"walk {reference.name}", total=None)
            reference_scores = walk_scores(reference, windows, top_k, device=device,
                                           on_layer=lambda i, n: progress.update(task, completed=i, total=n))
            progress.update(task, completed=progress.tasks[task].total)
        task = progress.add_task(f"walk {model.name}", total=None)
        scores = walk_scores(model, windows, top_k, reference_scores, device=device,
                             on_layer=lambda i, n: progress.update(task, completed=i, total=n))
        progress.update(task, completed=progress.tasks[task].total)
    if save_to is not None:
        kept = reference_scores if reference_scores is not None and not stored else scores
        save_reference(kept, save_to, {"dataset": dataset, "seq_len": int(windows.shape[1]),
                                       "model": str(reference if reference_scores is not None and not stored else model)})
    return walked_comparison(scores, reference_scores, experts)


def _version() -> str:
    from scoutq import __version__

    return __version__


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_plots(report: dict[str, Any], directory: Path) -> None:
    import numpy as np

    from scoutq.evaluate.plots import bar_chart_png, heatmap_png

    directory.mkdir(parents=True, exist_ok=True)
    errors = report["quantization_error"]
    if errors is not None and errors["layers"]:
        for key, title, missing in (("weight_sqnr_db", "Expert weight SQNR", "all-zero weights"),
                                    ("output_sqnr_db", "Expert output SQNR", "no tokens routed")):
            values = np.array([[np.nan if v is None else v for v in row] for row in errors[key]], dtype=float)
            # The JSON report stores +/-inf (an exactly reproduced expert) as +/-1e308: undo that, or
            # one such cell would stretch the colour scale until every other cell looks the same.
            values = np.where(np.abs(values) >= 1e308, np.sign(values) * np.inf, values)
            heatmap_png(directory / f"{key}.png", values, f"{title} per MoE layer", value_label="SQNR (dB)",
                        missing_label=missing, row_ids=errors["layers"])
    elif report["reference"] is not None:
        error_console.print("[yellow]note:[/] the model is not quantized: no expert error heatmaps")
    if report["routing"]:
        shares = np.array([entry["expert_share"] for entry in report["routing"]], dtype=float)
        reference = None
        if report["routing"][0]["reference_expert_share"] is not None:
            reference = np.array([entry["reference_expert_share"] for entry in report["routing"]], dtype=float)
        bar_chart_png(directory / "routing.png", shares, "Share of routed tokens per expert", reference=reference,
                      row_ids=[entry["layer"] for entry in report["routing"]])
