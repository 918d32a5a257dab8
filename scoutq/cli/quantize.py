"""`scoutq quantize`: a quantized compressed-tensors checkpoint, written shard by shard, or one GGUF file."""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from scoutq.calibrate.estimate import estimate_calibration_memory
from scoutq.calibrate.job import CalibrationRun
from scoutq.calibrate.quantizer import CalibrationSettings
from scoutq.checkpoint.lock import output_lock
from scoutq.checkpoint.reader import Checkpoint
from scoutq.cli._calibration import calibration_progress, coverage_summary
from scoutq.cli._launch import command_line, launch, without_nproc
from scoutq.cli._output import byte_progress, console, error_console, human_bytes, result_json, table
from scoutq.data.sets import calibration_batch, load_calibration_set
from scoutq.errors import ScoutqError
from scoutq.pipeline.gguf_export import estimate_export_memory, export_gguf
from scoutq.pipeline.gguf_export import work_dir as gguf_work_dir
from scoutq.pipeline.preflight import (
    calibration_state_bytes,
    check_disk,
    memory_warning,
    require_disk,
    require_writable,
)
from scoutq.pipeline.quantize import estimate_peak_memory, quantize_checkpoint, writes_signed_scales
from scoutq.quant.gguf_plan import GgufTensor, gguf_tensors
from scoutq.quant.plan import QuantPlan, build_plan
from scoutq.quant.recipe import OutputFormat, Recipe, load_recipe
from scoutq.stream.processes import join, launched_ranks, resolve_device

EXAMPLES = """Examples:

  scoutq quantize ./Llama-4-Scout-17B-16E-Instruct --recipe w4a16-g128 --out ./scout-w4a16

  scoutq quantize ./scout --recipe recipes/mixed.yaml --out ./scout-mixed --dry-run

  scoutq quantize ./scout --recipe w8a16 --out ./scout-w8 --json > report.json

  scoutq quantize ./scout --recipe w4a16-g128-gptq --out ./scout-gptq --calibration wikitext2 --samples 128

  scoutq quantize ./tiny --recipe w4a16-g128-clip --out ./tiny-clip --all-experts --min-tokens 64

  scoutq quantize ./scout --recipe w4a16-g128-gptaq --out ./scout-gptaq --nproc 4

  torchrun --nproc-per-node 4 -m scoutq quantize ./scout --recipe w4a16-g128-gptq --out ./scout-gptq

  scoutq quantize ./scout --recipe gguf-q4_0-gptaq --out ./scout-q4_0-gptaq.gguf

An interrupted run resumes: run the same command again.
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ScoutqError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def plan_rows(plan: QuantPlan) -> list[dict[str, object]]:
    """role -> scheme -> modules, tensors, bytes in and out (the dry-run table)."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for item in plan.items:
        key = (item.module.role.value, item.scheme.describe() if item.scheme else "keep")
        row = rows[key]
        row[0] += 1
        row[1] += len(item.outputs)
        row[2] += item.bytes_in
        row[3] += item.bytes_out
    return [{"role": role, "scheme": scheme, "modules": m, "tensors": t, "bytes_in": i, "bytes_out": o}
            for (role, scheme), (m, t, i, o) in sorted(rows.items())]


def gguf_rows(tensors: list[GgufTensor]) -> list[dict[str, object]]:
    """role -> ggml type -> tensors, bytes in and out (the dry-run table of a GGUF recipe)."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for tensor in tensors:
        role = tensor.parts[0].module.role.value if tensor.parts else "rope_freqs"
        row = rows[(role, tensor.kind)]
        row[0] += len(tensor.parts) or 1
        row[1] += 1
        row[2] += tensor.bytes_in
        row[3] += tensor.nbytes
    return [{"role": role, "scheme": kind, "modules": m, "tensors": t, "bytes_in": i, "bytes_out": o}
            for (role, kind), (m, t, i, o) in sorted(rows.items())]


def quantize(
    src: Annotated[Path, typer.Argument(help="Source checkpoint directory (read only).")],
    recipe: Annotated[str, typer.Option(help="Recipe file, or the name of a shipped recipe (recipes/*.yaml).")],
    out: Annotated[Path | None, typer.Option(
        help="Destination directory (compressed-tensors), or the .gguf file of a gguf-* recipe.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and memory estimate; read headers only.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty destination that is not a run of this command.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Output shard size bound.")] = "5GB",
    workers: Annotated[int, typer.Option(help="Quantization threads.", min=1)] = 2,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
    calibration: Annotated[str | None, typer.Option(
        help="Calibration set: a calibration/*.yaml name (builtin, builtin-train, wikitext2, c4, pile-val), a YAML path, "
             "or a .txt/.jsonl/.parquet file. Overrides the recipe's.")] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration sequences (overrides recipe and set).", min=1)] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration sequence.", min=2)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for drawing calibration windows.")] = None,
    all_experts: Annotated[bool | None, typer.Option(
        "--all-experts/--routed-only",
        help="Every expert's statistics see all tokens (scaled by its own router score), or only its routed tokens.")] = None,
    min_tokens: Annotated[int | None, typer.Option(
        help="Experts routed fewer tokens fall back to the recipe's fallback (rtn or all_experts).", min=0)] = None,
    device: Annotated[str, typer.Option(
        help="Where the calibrated layer walk computes: cpu, cuda (this rank's GPU) or auto (cuda when visible).")
    ] = "cpu",
    nproc: Annotated[int, typer.Option(
        help="Processes (torch.distributed ranks: gloo on CPU, NCCL on GPU) that share the run: calibration "
             "windows and module groups, or the round-to-nearest tensors. The output is byte-identical for any "
             "number. Under torchrun, WORLD_SIZE decides instead.", min=1)] = 1,
) -> None:
    """Quantize a Llama 4 checkpoint's experts (and whatever else the recipe says) to int8/int4.

    Reads the source one expert slice or tensor at a time and writes compressed-tensors
    `pack-quantized` safetensors that vLLM and transformers load, or, for a gguf-* recipe
    (`format: gguf`), one GGUF file that llama.cpp runs. Router, norms and embeddings always
    stay in source precision.
    """
    if nproc > 1 and launched_ranks() == 1 and not dry_run:
        raise typer.Exit(launch(without_nproc(command_line), nproc))
    chosen_device = resolve_device(device)
    ranks = join(chosen_device)
    if not ranks.writer:
        json = False  # one report per run: rank 0's
    checkpoint = Checkpoint.open_for_planning(src) if dry_run else Checkpoint.open(src)
    if "quantization_config" in checkpoint.config_json:
        raise ScoutqError(f"{src}: is already quantized (config.json has quantization_config)")
    checkpoint.validate_shapes()
    chosen = with_overrides(load_recipe(recipe), calibration=calibration, samples=samples, seq_len=seq_len,
                            seed=seed, all_experts=all_experts, min_tokens=min_tokens)
    plan = build_plan(checkpoint, chosen)
    gguf = chosen.format == OutputFormat.GGUF
    if out is not None and out.suffix == ".gguf" and not gguf:
        raise ScoutqError(f"--out {out}: recipe {chosen.name!r} writes compressed-tensors; a .gguf file needs a gguf-* "
                          "recipe (format: gguf), for example gguf-q4_0 or gguf-q4_0-gptaq")
    shard_bytes = parse_size(max_shard_size)
    if gguf:
        tensors = gguf_tensors(checkpoint, plan)
        peak, rows = estimate_export_memory(tensors), gguf_rows(tensors)
    else:
        peak, rows = estimate_peak_memory(plan, workers), plan_rows(plan)
    totals = {"bytes_in": sum(r["bytes_in"] for r in rows), "bytes_out": sum(r["bytes_out"] for r in rows)}

    calibration_peak = None
    state_bytes = 0
    if chosen.calibrated:
        settings = chosen.calibration
        assert settings is not None
        cset = load_calibration_set(settings.dataset)
        tokens = (settings.samples or cset.samples) * (settings.seq_len or cset.seq_len)
        calibration_peak = estimate_calibration_memory(checkpoint.config, tokens, settings.all_experts, chosen.gptq)
        peak = max(peak, calibration_peak)
        state_bytes = calibration_state_bytes(totals["bytes_out"], tokens, checkpoint.config.hidden_size,
                                              bool(chosen.gptq and chosen.gptq.fp_target))
    disk = None
    if out is not None:
        work = [out, gguf_work_dir(out)] if gguf else [out]
        disk = check_disk(out, totals["bytes_out"], 0 if gguf else min(shard_bytes, totals["bytes_out"]),
                          state_bytes, work)
    memory_note = memory_warning(peak, chosen.calibrated)
    if dry_run:
        if json:
            result_json({"recipe": plan.recipe.name, "plan": rows, **totals, "estimated_peak_rss_bytes": peak,
                         "estimated_calibration_peak_rss_bytes": calibration_peak, "warnings": plan.warnings,
                         "disk": None if disk is None else {"path": str(disk.path), "needed_bytes": disk.needed,
                                                            "free_bytes": disk.free, "enough": disk.enough},
                         "memory_warning": memory_note})
            return
        table(f"Plan: {plan.recipe.name} on {src}", ["role", "scheme", "modules", "tensors", "bytes in", "bytes out"],
              [[str(r["role"]), str(r["scheme"]), str(r["modules"]), str(r["tensors"]), human_bytes(r["bytes_in"]),  # type: ignore[arg-type]
                human_bytes(r["bytes_out"])] for r in rows], right_align_from=2)  # type: ignore[arg-type]
        console.print(f"total {human_bytes(totals['bytes_in'])} -> {human_bytes(totals['bytes_out'])} "
                      f"({totals['bytes_out'] / max(totals['bytes_in'], 1):.1%}); "
                      f"estimated peak memory {human_bytes(peak)} with {workers} worker(s)")
        if chosen.calibrated:
            settings = chosen.calibration
            assert settings is not None
            console.print(f"calibration: {chosen.method.value} on {settings.dataset} "
                          f"({settings.samples or cset.samples} x {settings.seq_len or cset.seq_len} tokens), "
                          f"all_experts={settings.all_experts}, min_tokens={settings.min_tokens}, "
                          f"fallback={settings.fallback.value}; layer walk peak about {human_bytes(calibration_peak or 0)}")
        if disk is not None:
            verdict = "enough" if disk.enough else "[red]NOT enough[/]: the run would be refused"
            console.print(f"disk: {escape(disk.line(out))}: {verdict}")  # type: ignore[arg-type]
        if memory_note:
            error_console.print(f"[yellow]warning:[/] {escape(memory_note)}")
        for warning in plan.warnings:
            error_console.print(f"[yellow]warning:[/] {warning}")
        return

    if out is None or disk is None:
        raise ScoutqError("--out is required (or pass --dry-run)")
    if ranks.writer:
        require_writable(out)  # before any work: hours later is too late to learn the disk is full
        require_disk(disk, out)
    for warning in plan.warnings:
        error_console.print(f"[yellow]warning:[/] {warning}")
    run = None
    if chosen.calibrated:
        settings = chosen.calibration
        assert settings is not None
        batch = calibration_batch(load_calibration_set(settings.dataset), Path(src), settings.samples,
                                  settings.seq_len, settings.seed)
        run = CalibrationRun(batch, CalibrationSettings.from_recipe(chosen))
    if memory_note and ranks.writer:  # after every input check, right before the work starts
        error_console.print(f"[yellow]warning:[/] {escape(memory_note)}")
    try:
        with (output_lock(out) if ranks.writer else nullcontext()), \
                calibration_progress(enabled=run is not None and ranks.writer) as (on_layer, on_step):
            with byte_progress(plan.recipe.name, enabled=ranks.writer) as progress:
                task = progress.add_task(f"write {plan.recipe.name}", total=totals["bytes_in"])
                advance = lambda n: progress.advance(task, n)  # noqa: E731
                if gguf:
                    report = export_gguf(src, plan, checkpoint, out, overwrite=overwrite, on_progress=advance,
                                         calibration=run, on_layer=on_layer, on_layer_step=on_step, ranks=ranks,
                                         device=chosen_device)
                else:
                    report = quantize_checkpoint(src, plan, checkpoint, out, max_shard_bytes=shard_bytes,
                                                 workers=workers, overwrite=overwrite, on_progress=advance,
                                                 calibration=run, on_layer=on_layer, on_layer_step=on_step,
                                                 ranks=ranks, device=chosen_device)
    except KeyboardInterrupt:
        kept = "finished tensors are kept beside it" if gguf else f"finished shards are kept in {out}"
        error_console.print(f"interrupted: {kept}; run the same command again to resume")
        raise typer.Exit(130) from None
    if not ranks.writer:
        return  # rank 0 reports for the run
    summary = {**report.__dict__, "throughput_gb_s": report.bytes_in / 1e9 / max(report.seconds, 1e-9)}
    if json:
        result_json(summary)
        return
    if report.coverage is not None:
        coverage_summary(report.coverage)
    if report.already_complete:
        console.print(f"{out} already holds this exact result ({'identity' if gguf else 'manifest'} matches); "
                      "nothing to do")
        return
    if gguf:
        console.print(f"wrote {out}: {human_bytes(report.bytes_in)} -> {human_bytes(report.bytes_out)} "
                      f"in {report.seconds:.1f} s ({summary['throughput_gb_s']:.2f} GB/s)")
        return
    resumed = f", {report.shards_reused} reused from an interrupted run" if report.shards_reused else ""
    console.print(f"wrote {out}: {report.shards} shard(s){resumed}, {human_bytes(report.bytes_in)} -> "
                  f"{human_bytes(report.bytes_out)} in {report.seconds:.1f} s ({summary['throughput_gb_s']:.2f} GB/s)")
    if writes_signed_scales(plan):
        error_console.print("[yellow]note:[/] this output has signed (negative) int4 scales (recipe signed_scales: "
                            "true; recorded in the manifest). vLLM's W4A16 kernels read them correctly; its Marlin "
                            "int8-activation path (VLLM_MARLIN_INPUT_DTYPE=int8) reads them as unsigned. For that "
                            "path, quantize with `signed_scales: false` in the recipe.")


def with_overrides(recipe: Recipe, *, calibration: str | None, samples: int | None, seq_len: int | None,
                   seed: int | None, all_experts: bool | None, min_tokens: int | None) -> Recipe:
    """The recipe with command-line calibration options applied; they are recorded in the
    manifest's recipe, so the output says how it was really made."""
    given = {"dataset": calibration, "samples": samples, "seq_len": seq_len, "seed": seed,
             "all_experts": all_experts, "min_tokens": min_tokens}
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        return recipe
    if recipe.calibration is None:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in given)
        raise ScoutqError(f"{flags}: recipe {recipe.name!r} is data-free (method {recipe.method.value}); "
                          "calibration options apply to gptq and clip recipes")
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update=given)})
