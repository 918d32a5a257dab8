"""scoutq as an lm-evaluation-harness model, on the tiny-trained fixture.

The adapter's numbers are checked against scoutq's own runtime (log-probabilities, rolling
windows, generation one prompt at a time); the offline tasks run end to end through the
harness's Python API and its `lm_eval` command, on a bf16 and a quantized checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers.cli import quantize_or_fail, run_cli  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from scoutq.data.corpus import builtin_corpus  # noqa: E402
from scoutq.errors import ScoutqError  # noqa: E402
from scoutq.evaluate.compare import compare_models  # noqa: E402
from scoutq.evaluate.metrics import token_log_probs  # noqa: E402
from scoutq.evaluate.windows import document_windows  # noqa: E402
from scoutq.harness import run as harness_run  # noqa: E402
from scoutq.harness.lm import ScoutqLM  # noqa: E402

LIMIT = 6  # documents per task in the end-to-end runs


@pytest.fixture(scope="module")
def adapter(tiny_trained: Path) -> ScoutqLM:
    return ScoutqLM(pretrained=str(tiny_trained), dtype="fp32", batch_size=4, max_length=96)


@pytest.fixture(scope="module")
def quantized(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("harness") / "w4"
    quantize_or_fail(tiny_trained, "w4a16-g128", dst)
    return dst


def _request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _own_log_prob(adapter: ScoutqLM, context: str, continuation: str) -> float:
    """log p(continuation | context) straight from the runtime, one sequence, no padding; the
    input keeps its last max_length tokens, as the harness's HF model does. Tokens are split as
    the harness splits them (`_encode_pair`: trailing whitespace of the context moves to the
    continuation, the continuation's tokens are the tail of the whole text's)."""
    context_ids, continuation_ids = adapter._encode_pair(context, continuation)
    whole, scored = context_ids + continuation_ids, len(continuation_ids)
    kept = whole[-(adapter.max_length + 1):]
    logits = adapter.model(torch.tensor([kept[:-1]]))[0, -scored:]
    return -float(token_log_probs(logits, torch.tensor(kept[-scored:])).sum())


def test_loglikelihoods_equal_scoutq_log_probs(adapter: ScoutqLM) -> None:
    text = builtin_corpus().evaluation[0]
    pairs = [(text[:60], text[60:75]), (text[:200], " the"), (text[300:330], text[330:420]), ("object", ".__add__")]
    results = adapter.loglikelihood([_request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        own = _own_log_prob(adapter, context, continuation)
        # Batched and right-padded vs alone: the same fp32 math up to summation order.
        assert logprob == pytest.approx(own, abs=1e-4, rel=1e-5)
        assert isinstance(greedy, bool)
    assert all(logprob < 0 for logprob, _ in results)


def test_rolling_windows_are_scoutq_document_windows(adapter: ScoutqLM, tiny_trained: Path) -> None:
    documents = [*builtin_corpus().evaluation[:2], "A short one."]
    windows, scored = document_windows(tiny_trained, adapter.max_length + 1, None, documents)
    expected = [window for doc in documents for window in adapter.rolling_windows(doc)]
    assert len(expected) == windows.shape[0]
    for (context, continuation), row, keep in zip(expected, windows, scored, strict=True):
        whole = context + continuation
        assert row[: len(whole)].tolist() == whole  # the same tokens seen
        targets = row[1:][keep].tolist()
        assert targets == continuation  # and the same ones scored


def test_rolling_loglikelihood_equals_scoutq_eval_perplexity(adapter: ScoutqLM, tiny_trained: Path) -> None:
    documents = builtin_corpus().evaluation[:3]
    totals = adapter.loglikelihood_rolling([_request("loglikelihood_rolling", doc) for doc in documents])
    windows, scored = document_windows(tiny_trained, adapter.max_length + 1, None, documents)
    comparison = compare_models(adapter.model, None, windows, batch_size=4, scored=scored)
    harness = math.exp(-sum(totals) / comparison.tokens_scored)
    assert harness == pytest.approx(comparison.perplexity.value, rel=1e-5)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_trained: Path, adapter: ScoutqLM) -> None:
    text = builtin_corpus().evaluation[1]
    prompts = [text[:40], text[:170], text[500:520], text[900:1000]]  # different lengths: left padding
    settings = {"until": ["\n\n"], "max_gen_toks": 12}
    batched = adapter.generate_until([_request("generate_until", p, settings) for p in prompts])
    single = ScoutqLM(pretrained=str(tiny_trained), dtype="fp32", batch_size=1, max_length=96)
    alone = single.generate_until([_request("generate_until", p, settings) for p in prompts])
    assert batched == alone
    assert any(out.strip() for out in batched)


def test_sampling_is_refused(adapter: ScoutqLM) -> None:
    with pytest.raises(Exception, match="greedily"):
        adapter.generate_until([_request("generate_until", "x", {"do_sample": True, "temperature": 0.7})])


@pytest.mark.parametrize(("args", "named"), [({"batch_size": "0"}, "batch_size=0"),
                                             ({"max_length": "one"}, "max_length='one'"),
                                             ({"max_gen_toks": "0"}, "max_gen_toks=0"),
                                             ({"dtype": "fp8"}, "dtype='fp8'")])
def test_bad_model_args_are_one_line_before_the_model_loads(args: dict[str, str], named: str, tmp_path: Path) -> None:
    # The path does not exist: a load would fail differently, so the message shows the check came first.
    with pytest.raises(ScoutqError, match=re.escape(named)):
        ScoutqLM(pretrained=str(tmp_path / "absent"), **args)


@pytest.mark.parametrize("which", ["bf16", "quantized"])
def test_offline_tasks_through_the_python_api(which: str, tiny_trained: Path, quantized: Path) -> None:
    import lm_eval

    path = tiny_trained if which == "bf16" else quantized
    results = lm_eval.simple_evaluate(model="scoutq", model_args={"pretrained": str(path), "dtype": "bf16"},
                                      tasks=[harness_run.OFFLINE_GROUP], limit=LIMIT, batch_size=4,
                                      task_manager=harness_run.task_manager())
    scores = results["results"]
    assert 0.0 <= scores["scoutq_pydoc_cloze"]["acc,none"] <= 1.0
    assert 0.0 <= scores["scoutq_pydoc_next_word"]["exact_match,first_word"] <= 1.0
    assert 1.0 < scores["scoutq_pydoc_rolling"]["byte_perplexity,none"] < 10.0
    assert results["config"]["model"] == "scoutq"


@pytest.mark.parametrize("which", ["bf16", "quantized"])
def test_offline_tasks_through_the_lm_eval_command(which: str, tiny_trained: Path, quantized: Path,
                                                   tmp_path: Path) -> None:
    """`lm_eval --model scoutq` with no scoutq import by the caller: the .pth hook registers it."""
    command = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert command, "lm_eval is not installed beside this Python"
    path = tiny_trained if which == "bf16" else quantized
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([command, "--model", "scoutq", "--model_args", f"pretrained={path},backend=cpu,dtype=bf16",
                           "--include_path", str(harness_run.TASKS_DIR), "--tasks", "scoutq_offline",
                           "--limit", str(LIMIT), "--batch_size", "4", "--device", "cpu",
                           "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scoutq_pydoc_cloze" in done.stdout and "acc" in done.stdout
    (written,) = list((tmp_path / "out").rglob("results_*.json"))
    scores = json.loads(written.read_text())["results"]
    assert {"scoutq_pydoc_cloze", "scoutq_pydoc_next_word", "scoutq_pydoc_rolling"} <= set(scores)


def test_eval_tasks_report_recovery_and_rolling_agreement(quantized: Path, tiny_trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["eval", str(quantized), "--reference", str(tiny_trained), "--samples", "4",
                              "--windows", "documents", "--seq-len", "129", "--tasks", "scoutq_offline",
                              "--limit", str(LIMIT), "--json", str(tmp_path / "r.json"),
                              "--markdown", str(tmp_path / "r.md")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {(row["task"], row["metric"]): row for row in report["tasks"]["rows"]}
    cloze = rows[("scoutq_pydoc_cloze", "acc")]
    assert cloze["samples"] == LIMIT and cloze["reference"] is not None and cloze["stderr"] is not None
    if cloze["reference"] > 0:
        assert cloze["recovery"] == pytest.approx(cloze["value"] / cloze["reference"])
    rolling = rows[("scoutq_pydoc_rolling", "word_perplexity")]
    assert rolling["recovery"] == pytest.approx(rolling["reference"] / rolling["value"])
    assert report["tasks"]["rolling"]["scoutq_pydoc_rolling"]["documents"] == LIMIT
    markdown = (tmp_path / "r.md").read_text()
    assert "### Tasks" in markdown and "scoutq_pydoc_next_word" in markdown
    assert "Tasks (lm-evaluation-harness" in out


def test_rolling_task_perplexity_equals_documents_eval(tiny_trained: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Item 4 of the harness issue: the same text, the same windows, the same perplexity."""
    code, _, err = run_cli(["eval", str(tiny_trained), "--windows", "documents", "--seq-len", "257",
                            "--tasks", "scoutq_pydoc_rolling", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    harness = report["tasks"]["rolling"]["scoutq_pydoc_rolling"]
    assert harness["tokens"] == report["dataset"]["tokens_scored"]
    assert harness["token_perplexity"] == pytest.approx(report["perplexity"]["value"], rel=1e-3)


def test_unknown_task_is_one_line(tiny_trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["eval", str(tiny_trained), "--tasks", "no_such_task"], capsys)
    assert code == 1
    assert "unknown task no_such_task" in err and "scoutq_offline" in err and "Traceback" not in err


def test_hub_task_offline_is_one_line_naming_the_offline_choices(
    tiny_trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datasets
    from huggingface_hub import constants

    # use_cache_only flips these process-wide; monkeypatch puts them back afterwards.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(harness_run, "hub_reachable", lambda timeout=3.0: False)
    code, _, err = run_cli(["eval", str(tiny_trained), "--tasks", "arc_easy"], capsys)
    assert code == 1
    line = " ".join(err.split())
    assert "cannot load the task data" in line and "scoutq_pydoc_cloze" in line and "Traceback" not in err


def test_tasks_command_prints_the_include_path(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["tasks", "--path"], capsys)
    assert code == 0 and Path(out.strip()) == harness_run.TASKS_DIR
    assert (harness_run.TASKS_DIR / "scoutq_offline.yaml").is_file()


def test_shipped_task_data_is_what_task_data_generates() -> None:
    """The shipped questions are exactly task_data.py's output on the corpus they record."""
    from scoutq.harness import task_data

    documents = builtin_corpus().evaluation
    recorded = json.loads((task_data.DATA_DIR / "SOURCE.json").read_text())
    if task_data.corpus_fingerprint(documents) != recorded["corpus_sha256"]:
        pytest.skip("this Python's pydoc_data topics differ from those the shipped tasks were made from")
    for name, content in task_data.task_files(documents).items():
        assert (task_data.DATA_DIR / name).read_bytes() == content, name
    cloze = [json.loads(line) for line in (task_data.DATA_DIR / "pydoc_cloze.jsonl").read_text().splitlines()]
    assert all(len(q["choices"]) == task_data.CHOICES and 0 <= q["label"] < task_data.CHOICES for q in cloze)
    assert len({q["label"] for q in cloze}) == task_data.CHOICES  # the true ending is not always in one place


def test_gguf_file_through_the_adapter(tiny_trained: Path, adapter: ScoutqLM, tmp_path: Path) -> None:
    """A GGUF file is a harness model too: its embedded vocabulary, its dequantized weights."""
    gguf = tmp_path / "tiny-q8_0.gguf"
    quantize_or_fail(tiny_trained, "gguf-q8_0", gguf)
    model = ScoutqLM(pretrained=str(gguf), dtype="fp32", batch_size=4, max_length=96)
    text = builtin_corpus().evaluation[2]
    pairs = [(text[:80], text[80:120]), (text[200:260], " and")]
    assert [model.tok_encode(c) for c, _ in pairs] == [adapter.tok_encode(c) for c, _ in pairs]
    results = model.loglikelihood([_request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, results, strict=True):
        assert logprob == pytest.approx(_own_log_prob(model, context, continuation), abs=1e-4, rel=1e-5)
        # Q8_0 weights: close to the bf16 checkpoint's score, not equal to it.
        assert logprob == pytest.approx(_own_log_prob(adapter, context, continuation), rel=0.05)
