"""`scoutq quantize` end to end on the tiny fixture.

What a finished output must be (compressed-tensors `pack-quantized`, quantized-formats.md B1,
B3, B8): a quantization_config in config.json, every routed expert as per-expert 2-D keys,
everything left in source precision byte-identical to the source, copied tokenizer files and
a manifest whose hashes match. How it must be made: deterministically, never touching the
source, refusing to clobber a foreign destination, and resuming after SIGKILL or Ctrl-C to
exactly the bytes an uninterrupted run writes, without rewriting shards already finished.

Runs go through `main([...])` in process; the kill/interrupt runs are real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoutq.checkpoint.layout import MULTIMODAL
from scoutq.checkpoint.manifest import MANIFEST_NAME
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.safetensors_io import read_header
from scoutq.cli.app import main
from scoutq.fixtures import presets
from scoutq.pipeline.quantize import FAULT_ENV, JOURNAL_NAME
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import Module, build_plan
from scoutq.quant.recipe import load_recipe, shipped_recipes
from scoutq.quant.rtn import rtn_quantize

# compressed-tensors recipes; the gguf-* ones write one GGUF file (tests/gguf_files/).
RECIPES = [path.stem for path in shipped_recipes() if load_recipe(path).format == "compressed-tensors"]
RTN_RECIPES = [name for name in RECIPES if not load_recipe(name).calibrated]  # calibrated ones: test_calibrated_quantize.py
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
SMALL_SHARDS = "300KB"  # the tiny w4a16 output (~1.75 MB) becomes 7 shards
RESUME_RECIPE = "w4a16-g128"
LAYERS, EXPERTS = 4, 4  # the tiny fixture
SCOUT_BF16_BYTES = 217_283_587_072  # the real Scout: 108.64B parameters in bf16


# -- running the CLI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def calibration_args(recipe: str) -> list[str]:
    """A calibrated recipe's run on fewer tokens than its set's default (512 x 256 for
    builtin-train): these tests check files and bytes, not calibration quality, which
    tests/calibrate/ and `make bench-quality` measure."""
    return ["--samples", "16", "--seq-len", "64"] if load_recipe(recipe).calibrated else []


def quantize(src: Path, recipe: str, dst: Path | None, *extra: str) -> int:
    """`scoutq quantize` in process; the exit code (output goes to pytest's capture)."""
    argv = ["quantize", str(src), "--recipe", recipe, *extra]
    if dst is not None:
        argv += ["--out", str(dst)]
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def run_captured(capsys: pytest.CaptureFixture[str], src: Path, recipe: str, dst: Path | None, *extra: str) -> Run:
    capsys.readouterr()
    code = quantize(src, recipe, dst, *extra)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def assert_one_error_line(run: Run, *names: str) -> str:
    """Exit 1 and exactly one `error:` line on stderr (the last), naming every string given.

    The progress bar also goes to stderr, so lines before the error are allowed.
    """
    assert run.code == 1, (run.code, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.rstrip("\n").splitlines()[-1] == errors[0], run.stderr
    for name in names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    return errors[0]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SCOUTQ_DEBUG", FAULT_ENV)}
    return {**env, "NO_COLOR": "1", **extra}


def cli_command(src: Path, dst: Path, recipe: str = RESUME_RECIPE) -> list[str]:
    return [sys.executable, "-m", "scoutq.cli.app", "quantize", str(src), "--recipe", recipe,
            "--out", str(dst), "--max-shard-size", SMALL_SHARDS]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCOUTQ_DEBUG", raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)


# -- looking at directories --------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) -> sha256."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file under root -> (inode, size, mtime_ns, sha256): any rewrite shows."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            state[str(path.relative_to(root))] = (stat.st_ino, stat.st_size, stat.st_mtime_ns, sha256(path))
    return state


def finished_shards(dst: Path) -> dict[str, tuple[int, int]]:
    """Shards under their final names -> (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(dst.iterdir()) if SHARD.match(p.name)}


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def source_linear(source: dict[str, torch.Tensor], module: Module, width: int) -> torch.Tensor:
    """The nn.Linear weight [out, in] a planned module takes from the source tensors."""
    stored = source[module.source]
    if module.expert is None:
        return stored
    block = stored[module.expert]  # fused experts are stored [in, out]
    if module.proj == "gate":
        return block[:, :width].t()
    if module.proj == "up":
        return block[:, width:].t()
    return block.t()


# -- module fixtures: one output per recipe, made once -----------------------------------------


@dataclass
class Outputs:
    source: Path
    source_before: dict[str, tuple[int, int, int, str]]
    source_after: dict[str, tuple[int, int, int, str]]
    single: dict[str, Path]  # recipe -> output with the default shard size
    sharded: Path  # RESUME_RECIPE with SMALL_SHARDS


@pytest.fixture(scope="module")
def outputs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    root = tmp_path_factory.mktemp("quantized")
    before = snapshot(tiny_checkpoint)
    single = {}
    for recipe in RECIPES:
        single[recipe] = root / recipe
        assert quantize(tiny_checkpoint, recipe, single[recipe], *calibration_args(recipe)) == 0
    sharded = root / "sharded"
    assert quantize(tiny_checkpoint, RESUME_RECIPE, sharded, "--max-shard-size", SMALL_SHARDS) == 0
    return Outputs(tiny_checkpoint, before, snapshot(tiny_checkpoint), single, sharded)


# -- what a finished output holds --------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_has_compressed_tensors_quantization_config(recipe: str, outputs: Outputs) -> None:
    dst = outputs.single[recipe]
    source_config = json.loads((outputs.source / "config.json").read_text())
    config = json.loads((dst / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source_config  # nothing else in config.json changes

    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"] and isinstance(qc["ignore"], list)
    recipe_schemes = {rule.weights.scheme() for rule in load_recipe(recipe).rules}
    for group in qc["config_groups"].values():
        weights = group["weights"]
        assert group["format"] == "pack-quantized" and group["input_activations"] is None
        assert weights["type"] == "int" and weights["num_bits"] in (4, 8)
        assert weights["strategy"] == ("channel" if weights["group_size"] is None else "group")
        described = (weights["num_bits"], weights["group_size"], weights["symmetric"])
        assert any((s.bits, s.group_size, s.symmetric) == described for s in recipe_schemes)
        assert group["targets"] and all(t.startswith("re:") for t in group["targets"])

    # Every router is ignored, both by its checkpoint name (runtimes matching literally) and by
    # a pattern matching transformers 5's module name.
    for layer in range(LAYERS):
        router = MULTIMODAL.layer_key(layer, "feed_forward.router")
        assert router in qc["ignore"]
        hf_name = f"model.language_model.layers.{layer}.feed_forward.router"
        assert any(re.match(p[3:], hf_name) for p in qc["ignore"] if p.startswith("re:")), hf_name
        assert not any(re.match(t[3:], hf_name) for g in qc["config_groups"].values() for t in g["targets"])


@pytest.mark.parametrize("recipe", RTN_RECIPES)
def test_experts_are_written_per_expert_and_match_rtn(recipe: str, outputs: Outputs) -> None:
    dst = outputs.single[recipe]
    out = load_tensors(dst)
    source = load_tensors(outputs.source)
    symmetric = all(rule.weights.symmetric for rule in load_recipe(recipe).rules)

    assert not [k for k in out if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for proj in ("gate", "up", "down"):
                for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                    assert MULTIMODAL.expert_key(layer, expert, proj, suffix) in out
                zero = MULTIMODAL.expert_key(layer, expert, proj, "weight_zero_point")
                assert (zero in out) == (not symmetric), zero

    # Each quantized module is exactly rtn_quantize of its slice of the source (gate is the
    # first half of gate_up_proj's columns, up the second; stored [in, out]).
    checkpoint = Checkpoint.open(outputs.source)
    plan = build_plan(checkpoint, load_recipe(recipe))
    width = checkpoint.config.intermediate_size
    for item in plan.quantized():
        module = item.module
        state = {spec.name.rsplit(".", 1)[1]: out[spec.name] for spec in item.outputs}
        expected = rtn_quantize(source_linear(source, module, width), item.scheme)
        assert state.keys() == expected.state().keys(), module.name
        for suffix, tensor in expected.state().items():
            assert same_bytes(state[suffix], tensor), f"{module.name}.{suffix}"
        assert state["weight_packed"].dtype == torch.int32 and state["weight_scale"].dtype == torch.bfloat16
        assert state["weight_shape"].tolist() == list(module.shape)
        assert PackedWeight.from_state(state, item.scheme).shape == module.shape


@pytest.mark.parametrize("recipe", RECIPES)
def test_unquantized_tensors_are_byte_identical_to_the_source(recipe: str, outputs: Outputs) -> None:
    out = load_tensors(outputs.single[recipe])
    source = load_tensors(outputs.source)
    kept = [k for k in out if k in source]
    for key in kept:
        assert same_bytes(out[key], source[key]), key
    # Routers, norms and embeddings are always among them.
    text = [k for k in source if k.startswith(MULTIMODAL.model_prefix)]
    never_quantized = [k for k in text if k.endswith(("feed_forward.router.weight", "layernorm.weight"))
                       or k in (MULTIMODAL.norm_key, MULTIMODAL.embed_key)]
    assert len(never_quantized) == LAYERS * 3 + 2
    assert set(never_quantized) <= set(kept)
    # Everything else of the source is either kept or replaced by packed tensors.
    for key in set(source) - set(kept):
        module = key.removesuffix(".weight")
        assert key.endswith(("experts.gate_up_proj", "experts.down_proj")) or f"{module}.weight_packed" in out, key


@pytest.mark.parametrize("recipe", RECIPES)
def test_tokenizer_files_copied_and_manifest_hashes_match(recipe: str, outputs: Outputs) -> None:
    dst = outputs.single[recipe]
    for name in TOKENIZER_FILES:
        assert sha256(dst / name) == sha256(outputs.source / name), name
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    files = {name for name in file_hashes(dst) if name != MANIFEST_NAME}
    assert set(manifest["files"]) == files  # every file, no journal or partial left over
    for name, digest in manifest["files"].items():
        assert sha256(dst / name) == digest, name
    plan = build_plan(Checkpoint.open(outputs.source), load_recipe(recipe))
    assert manifest["quantized_modules"] == len(plan.quantized())


def test_small_max_shard_size_gives_several_shards_and_an_index(outputs: Outputs) -> None:
    dst, single = outputs.sharded, outputs.single[RESUME_RECIPE]
    shards = sorted(p.name for p in dst.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) >= 5 and all(SHARD.match(name) for name in shards)
    assert not (dst / "model.safetensors").exists()

    index = json.loads((dst / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for name in shards:
        header, _ = read_header(dst / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(header)
        assert sum(info.nbytes for info in header.values()) <= 300_000 or len(header) == 1
        total += sum(info.nbytes for info in header.values())
    assert index["metadata"]["total_size"] == total

    # Same tensors, same bytes as the single-shard output; config.json identical too.
    sharded_tensors, single_tensors = load_tensors(dst), load_tensors(single)
    assert sharded_tensors.keys() == single_tensors.keys()
    assert all(same_bytes(sharded_tensors[k], single_tensors[k]) for k in single_tensors)
    assert sha256(dst / "config.json") == sha256(single / "config.json")


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_runs_are_byte_identical(recipe: str, outputs: Outputs, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert quantize(outputs.source, recipe, again, *calibration_args(recipe)) == 0
    assert file_hashes(again) == file_hashes(outputs.single[recipe])


def test_text_only_checkpoint_quantizes(tiny_text_checkpoint: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    assert quantize(tiny_text_checkpoint, "w4a16-g128-asym", dst) == 0
    out = load_tensors(dst)
    assert "model.layers.3.feed_forward.experts.3.down_proj.weight_zero_point" in out
    assert not [k for k in out if k.startswith("language_model.")]
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert all(f"model.layers.{layer}.feed_forward.router" in ignore for layer in range(LAYERS))


# -- the destination: refusing, overwriting, nothing to do -------------------------------------


def test_finished_rerun_reports_complete_and_changes_nothing(
    outputs: Outputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    shutil.copytree(outputs.single["w8a16"], dst)
    before = snapshot(dst)
    run = run_captured(capsys, outputs.source, "w8a16", dst)
    assert run.code == 0 and "already holds this exact result" in " ".join(run.stdout.split())
    run = run_captured(capsys, outputs.source, "w8a16", dst, "--json")
    assert run.code == 0 and json.loads(run.stdout)["already_complete"] is True
    assert snapshot(dst) == before


@pytest.mark.parametrize("occupant", ["foreign-file", "other-recipe", "other-shard-size"])
def test_non_empty_destination_is_refused_unless_overwrite(
    occupant: str, outputs: Outputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    if occupant == "foreign-file":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine\n")
    elif occupant == "other-recipe":
        shutil.copytree(outputs.single["w8a16"], dst)
    else:  # the same recipe, but a different shard size is a different command
        shutil.copytree(outputs.sharded, dst)
    before = snapshot(dst)

    run = run_captured(capsys, outputs.source, RESUME_RECIPE, dst)
    assert_one_error_line(run, str(dst), "--overwrite")
    assert snapshot(dst) == before

    assert quantize(outputs.source, RESUME_RECIPE, dst, "--overwrite") == 0
    assert file_hashes(dst) == file_hashes(outputs.single[RESUME_RECIPE])


def test_destination_inside_source_or_a_file_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    before = snapshot(src)
    assert_one_error_line(run_captured(capsys, src, "w8a16", src / "out"), "outside the source")
    assert_one_error_line(run_captured(capsys, src, "w8a16", src), "outside the source")
    assert snapshot(src) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_error_line(run_captured(capsys, src, "w8a16", a_file), "not a directory")


# -- kill and resume ---------------------------------------------------------------------------


def shard_data_sizes(directory: Path) -> list[int]:
    """Tensor bytes of each shard of a finished output, in order."""
    shards = sorted(p for p in directory.iterdir() if SHARD.match(p.name))
    return [sum(info.nbytes for info in read_header(p)[0].values()) for p in shards]


@dataclass
class Killed:
    dst: Path
    fault_after: int
    returncode: int
    stderr: str
    expected_finished: int  # shards complete before the kill
    finished: dict[str, tuple[int, int]]  # shard -> (inode, mtime_ns) right after the kill


KILL_POINTS = ["early", "mid-second-shard", "later-shard"]


@pytest.fixture(scope="module")
def killed_runs(outputs: Outputs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    """One SIGKILLed run per kill point, started together to share the interpreter start-up time."""
    sizes = shard_data_sizes(outputs.sharded)
    assert len(sizes) >= 5
    points = {  # bytes of shard data after which the process kills itself, and shards finished by then
        "early": (1, 0),
        "mid-second-shard": (sizes[0] + sizes[1] // 2, 1),
        "later-shard": (sum(sizes[:4]) + sizes[4] // 3, 4),
    }
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for name, (after, _) in points.items():
        dst = root / name
        procs[name] = subprocess.Popen(cli_command(outputs.source, dst), env=cli_env(**{FAULT_ENV: str(after)}),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        dst = root / name
        killed[name] = Killed(dst, points[name][0], proc.returncode, stderr, points[name][1], finished_shards(dst))
    return killed


def assert_unfinished(dst: Path) -> None:
    """Nothing that looks like a finished output: no manifest, config.json or index."""
    for name in (MANIFEST_NAME, "config.json", INDEX, *TOKENIZER_FILES):
        assert not (dst / name).exists(), name
    assert (dst / JOURNAL_NAME).is_file()


def resume_and_compare(
    dst: Path, finished: dict[str, tuple[int, int]], outputs: Outputs, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rerun the same command: identical bytes to an uninterrupted run, finished shards kept."""
    run = run_captured(capsys, outputs.source, RESUME_RECIPE, dst, "--max-shard-size", SMALL_SHARDS, "--json")
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["shards_reused"] == len(finished) and not report["already_complete"]
    assert file_hashes(dst) == file_hashes(outputs.sharded)
    after = finished_shards(dst)
    for name, identity in finished.items():
        assert after[name] == identity, f"{name} was rewritten"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_identical_output(
    point: str, killed_runs: dict[str, Killed], outputs: Outputs, capsys: pytest.CaptureFixture[str]
) -> None:
    killed = killed_runs[point]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_unfinished(killed.dst)
    assert len(killed.finished) == killed.expected_finished
    for name in killed.finished:  # a shard under its final name is complete and correct
        assert sha256(killed.dst / name) == sha256(outputs.sharded / name), name
    journal = json.loads((killed.dst / JOURNAL_NAME).read_text())
    assert set(journal["shards"]) == set(killed.finished)
    resume_and_compare(killed.dst, killed.finished, outputs, capsys)


# The tiny run writes all of its shards in about 0.2 s, too fast to interrupt reliably between
# two shards. The subprocess therefore runs the unchanged CLI with StreamingWriter.write slowed
# by 10 ms per tensor piece (a test-only wrapper, nothing in scoutq is changed), which stretches
# the write phase to several seconds, so SIGINT lands after the first shard is renamed and
# before the last one is. A process started in the background by a non-interactive shell
# inherits SIGINT as ignored (as CI runners may start us); the child restores the default
# handler so the test measures scoutq's handling of Ctrl-C, not its parent's signal mask.
SLOW_WRITER_MAIN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from scoutq.checkpoint import safetensors_io
_write = safetensors_io.StreamingWriter.write
def slow_write(self, name, piece):
    time.sleep(0.01)
    _write(self, name, piece)
safetensors_io.StreamingWriter.write = slow_write
from scoutq.cli.app import main
main(sys.argv[1:])
"""


def test_sigint_exits_130_and_resumes_to_identical_output(
    outputs: Outputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    command = [sys.executable, "-c", SLOW_WRITER_MAIN, *cli_command(outputs.source, dst)[3:]]
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (dst.is_dir() and finished_shards(dst)):
        assert proc.poll() is None, "the run ended before a shard was finished"
        assert time.monotonic() < deadline, "no shard finished within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)

    # typer turns KeyboardInterrupt into a silent exit 130 before scoutq's main() sees it, so
    # there is no "error: interrupted" line to expect; no traceback either.
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert_unfinished(dst)
    finished = finished_shards(dst)
    assert 1 <= len(finished) < len(shard_data_sizes(outputs.sharded))
    resume_and_compare(dst, finished, outputs, capsys)


# -- bad tensor values -------------------------------------------------------------------------

BF16_NAN, BF16_INF = struct.pack("<H", 0x7FC0), struct.pack("<H", 0x7F80)


def poison(checkpoint: Path, tensor: str, byte_offset: int, value: bytes) -> None:
    """Overwrite bytes of one tensor in place, at `byte_offset` into its data."""
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    shard = checkpoint / weight_map[tensor]
    info = read_header(shard)[0][tensor]
    with open(shard, "r+b") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_len + info.begin + byte_offset)
        handle.write(value)


@pytest.mark.parametrize(
    ("tensor", "expert", "value"),
    [
        (MULTIMODAL.gate_up_key(1), 2, BF16_NAN),
        (MULTIMODAL.gate_up_key(1), 3, BF16_INF),
        (MULTIMODAL.down_key(3), 0, BF16_NAN),
        (MULTIMODAL.layer_key(2, "feed_forward.router.weight"), None, BF16_INF),
    ],
    ids=["gate_up-nan", "gate_up-inf", "down-nan", "router-inf"],
)
def test_nan_or_inf_in_source_is_refused_by_name(
    tensor: str, expert: int | None, value: bytes, tiny_checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    shape = Checkpoint.open(src).info(tensor).shape
    per_expert = 2 * shape[1] * shape[2] if expert is not None else 0
    poison(src, tensor, (expert or 0) * per_expert + 2 * 37, value)

    dst = tmp_path / "out"
    run = run_captured(capsys, src, "w8a16", dst)
    names = [repr(tensor)] + ([f"(expert {expert})"] if expert is not None else [])
    line = assert_one_error_line(run, *names, "NaN or Inf")
    assert line.startswith(f"error: {src}")
    assert not (dst / MANIFEST_NAME).exists() and not (dst / "config.json").exists()


# -- dry run on the real Scout's config --------------------------------------------------------


@pytest.fixture
def scout_config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "scout"
    directory.mkdir()
    config = presets.multimodal_config(presets.scout_text_config(48), presets.scout_vision_config(34))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def test_dry_run_plans_the_real_scout_from_config_alone(
    scout_config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_captured(capsys, scout_config_dir, "w4a16-g128", None, "--dry-run")
    assert run.code == 0, run.stderr
    for text in ("experts_gate_up", "experts_down", "int4-g128-sym", "router", "keep", "estimated peak memory"):
        assert text in run.stdout, text

    run = run_captured(capsys, scout_config_dir, "w4a16-g128", None, "--dry-run", "--json")
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["bytes_in"] == SCOUT_BF16_BYTES
    assert sum(row["bytes_in"] for row in report["plan"]) == SCOUT_BF16_BYTES
    assert 0.25 < report["bytes_out"] / report["bytes_in"] < 0.35  # int4 experts, the rest bf16
    experts = {row["role"]: row for row in report["plan"] if row["role"].startswith("experts_")}
    assert experts["experts_gate_up"]["modules"] == 48 * 16 * 2 and experts["experts_down"]["modules"] == 48 * 16
    # A streaming run holds a few expert slices, not the model: well under 4 GiB.
    assert 450 * 2**20 < report["estimated_peak_rss_bytes"] < 4 * 2**30
    assert [p.name for p in scout_config_dir.iterdir()] == ["config.json"]


def test_config_only_directory_cannot_be_quantized_for_real(
    scout_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    assert_one_error_line(run_captured(capsys, scout_config_dir, "w4a16-g128", dst), str(scout_config_dir))
    assert not dst.exists()


# -- last: the source survived every run above -------------------------------------------------


def test_source_was_never_modified(outputs: Outputs, killed_runs: dict[str, Killed]) -> None:
    """Runs in file order, after every in-process run, kill and resume above read the source."""
    assert outputs.source_after == outputs.source_before
    assert snapshot(outputs.source) == outputs.source_before
