"""Recipes: the shipped YAML files, strict validation, and the lint `build_plan` applies.

A recipe is validated twice. `load_recipe` checks the file on its own (unknown keys, bit
widths, group sizes, target syntax), always naming the file. `build_plan` then checks it
against a checkpoint: a rule that matches nothing, a router / norm / embedding that would be
quantized, routed experts of one layer with different schemes, and a group size that does
not divide a module's input features are all refused, naming the rule or the tensor.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from scoutq.checkpoint.reader import Checkpoint
from scoutq.cli.app import main
from scoutq.errors import ScoutqError
from scoutq.quant.plan import QuantPlan, build_plan
from scoutq.quant.recipe import Recipe, load_recipe, shipped_recipes
from scoutq.quant.scheme import Scheme

SHIPPED = shipped_recipes()
EXPERTS_W4 = "weights: {bits: 4, group_size: 128, symmetric: true}"


def write_recipe(directory: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def one_rule(targets: str, weights: str = EXPERTS_W4, extra: str = "") -> str:
    """A recipe with one rule, `targets` given as YAML flow list content."""
    return f"name: test\nmethod: rtn\nrules:\n  - targets: [{targets}]\n    {weights}\n{extra}"


def plan_for(checkpoint_dir: Path, recipe_path: Path) -> QuantPlan:
    return build_plan(Checkpoint.open(checkpoint_dir), load_recipe(recipe_path))


# -- shipped recipes ---------------------------------------------------------------------------


def test_the_expected_recipes_ship() -> None:
    assert {p.stem for p in SHIPPED} >= {"w4a16-g128", "w4a16-g128-asym", "w8a16", "mixed", "w4a16-g128-gptq",
                                        "w4a16-g128-gptaq", "w4a16-g128-clip", "w8a16-gptq"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads_by_path_and_by_name(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # Only a GGUF conversion (gguf-bf16) may quantize nothing.
    assert recipe.rules or recipe.format == "gguf"
    assert all(rule.weights.scheme() for rule in recipe.rules)
    assert load_recipe(path.stem) == recipe  # a bare name resolves to the shipped file


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_yaml_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    dumped = tmp_path / path.name
    dumped.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    again = load_recipe(dumped)
    assert again == recipe
    assert again.fingerprint() == recipe.fingerprint()  # formatting and comments do not count


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_text_checkpoint"])
def test_shipped_recipe_plans_cleanly_on_the_tiny_checkpoints(
    path: Path, fixture: str, request: pytest.FixtureRequest
) -> None:
    plan = plan_for(request.getfixturevalue(fixture), path)
    quantized = plan.quantized()
    if not plan.recipe.rules:  # a plain GGUF conversion
        assert not quantized
        return
    assert quantized
    assert all(item.module.role.value not in ("router", "embed") for item in quantized)
    # Every routed expert of every layer is quantized, per expert and projection.
    experts = [item for item in quantized if item.module.expert is not None]
    assert len(experts) == 4 * 4 * 3  # 4 layers x 4 experts x gate/up/down


# -- validation of the file itself -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (one_rule("routed_experts", extra="rulez: []\n"), "rulez"),
        (one_rule("routed_experts", weights="weights: {bits: 4, group_sizes: 128}"), "group_sizes"),
        (one_rule("routed_experts", weights="weights: {bits: 4}\n    scheme: w4a16"), "scheme"),
        (one_rule("routed_experts").replace("targets", "target"), "target"),
    ],
    ids=["top-level", "weights", "rule", "misspelt-targets"],
)
def test_unknown_keys_are_rejected_naming_the_file(body: str, where: str, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, body)
    with pytest.raises(ScoutqError) as raised:
        load_recipe(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:"), message
    assert where in message


@pytest.mark.parametrize(
    ("weights", "complaint"),
    [
        ("weights: {bits: 3, group_size: 128}", "bits"),
        ("weights: {bits: 2}", "bits"),
        ("weights: {bits: 4, group_size: 100}", "group_size"),
        ("weights: {bits: 4, group_size: 0}", "group_size"),
        ("weights: {bits: 4, group_size: -128}", "group_size"),
    ],
)
def test_unsupported_bits_and_group_sizes_are_rejected(weights: str, complaint: str, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, one_rule("routed_experts", weights=weights))
    with pytest.raises(ScoutqError, match=complaint) as raised:
        load_recipe(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (one_rule("routed_expert"), "unknown target 'routed_expert'"),
        (one_rule("'re:.*experts[.'"), "not a valid regular expression"),
        ("name: test\nmethod: awq\nrules:\n  - targets: [routed_experts]\n    " + EXPERTS_W4 + "\n", "method"),
        ("name: test\nmethod: rtn\nrules: []\n", "rules"),
        ("- just\n- a list\n", "YAML mapping"),
        ("name: [unclosed\n", "cannot read recipe"),
    ],
    ids=["typo-target", "bad-regex", "unknown-method", "no-rules", "not-a-mapping", "bad-yaml"],
)
def test_malformed_recipes_are_rejected_naming_the_file(body: str, complaint: str, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, body)
    with pytest.raises(ScoutqError, match=complaint) as raised:
        load_recipe(path)
    assert str(path) in str(raised.value)


def test_missing_recipe_lists_the_shipped_ones() -> None:
    with pytest.raises(ScoutqError, match="no such recipe file") as raised:
        load_recipe("w3a16")
    assert all(path.stem in str(raised.value) for path in SHIPPED)


def test_defaults_and_scheme_conversion(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, one_rule("routed_experts", weights="weights: {bits: 8}")))
    assert isinstance(recipe, Recipe)
    assert recipe.rules[0].weights.scheme() == Scheme(8, None, True)
    assert recipe.ignore == [] and recipe.description == ""


# -- lint against a checkpoint -----------------------------------------------------------------


def test_rule_matching_nothing_is_an_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The tiny fixture has MoE in every layer, so no dense MLP exists."""
    body = (
        "name: test\nmethod: rtn\nrules:\n"
        f"  - targets: [routed_experts]\n    {EXPERTS_W4}\n"
        "  - targets: [dense_mlp]\n    weights: {bits: 8}\n"
    )
    with pytest.raises(ScoutqError, match=r"rule 2 \(dense_mlp\) matches nothing"):
        plan_for(tiny_checkpoint, write_recipe(tmp_path, body))


def test_rule_shadowed_by_an_earlier_one_matches_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    body = (
        "name: test\nmethod: rtn\nrules:\n"
        f"  - targets: [routed_experts]\n    {EXPERTS_W4}\n"
        "  - targets: ['re:.*experts\\.\\d+\\.gate_proj']\n    weights: {bits: 8}\n"
    )
    with pytest.raises(ScoutqError, match="rule 2 .* matches nothing"):
        plan_for(tiny_checkpoint, write_recipe(tmp_path, body))


@pytest.mark.parametrize(
    ("targets", "named"),
    [
        ("router", "feed_forward.router.weight"),
        ("'re:.*\\.feed_forward\\.router'", "feed_forward.router.weight"),
        ("'re:.*layers\\.2\\.feed_forward\\..*'", "layers.2.feed_forward.router.weight"),
        ("norms", "norm.weight"),
        ("embeddings", "embed_tokens.weight"),
    ],
    ids=["router-group", "router-regex", "regex-sweeping-in-a-router", "norms", "embeddings"],
)
@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_text_checkpoint"])
def test_never_quantized_roles_are_refused_by_name(
    targets: str, named: str, fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = write_recipe(tmp_path, one_rule(targets, weights="weights: {bits: 8}"))
    with pytest.raises(ScoutqError, match="routers, norms and embeddings") as raised:
        plan_for(request.getfixturevalue(fixture), path)
    assert named in str(raised.value)


def test_router_is_refused_even_behind_an_allowed_target(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, one_rule("routed_experts, router", weights="weights: {bits: 8}"))
    router = r"the router \(language_model\.model\.layers\.0\.feed_forward\.router\.weight\)"
    with pytest.raises(ScoutqError, match=router):
        plan_for(tiny_checkpoint, path)


def test_ignored_router_is_not_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`ignore` wins over rules, so a broad regex with the router ignored is fine."""
    extra = "ignore: ['re:.*router']\n"
    path = write_recipe(tmp_path, one_rule("'re:.*feed_forward\\..*'", weights="weights: {bits: 8}", extra=extra))
    plan = plan_for(tiny_checkpoint, path)
    assert not [item for item in plan.quantized() if "router" in item.module.name]


@pytest.mark.parametrize(
    "body",
    [
        one_rule("'re:.*experts\\.0\\..*'"),
        one_rule("'re:.*experts\\.\\d+\\.(gate|up)_proj'"),  # down_proj left unquantized
        (
            "name: test\nmethod: rtn\nrules:\n"
            f"  - targets: ['re:.*experts\\.[01]\\..*']\n    {EXPERTS_W4}\n"
            "  - targets: [routed_experts]\n    weights: {bits: 8}\n"
        ),
    ],
    ids=["one-expert", "one-projection", "two-schemes"],
)
def test_experts_of_one_layer_must_share_one_scheme(body: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ScoutqError, match=r"layer \d+'s routed experts different schemes"):
        plan_for(tiny_checkpoint, write_recipe(tmp_path, body))


def test_one_scheme_per_layer_may_differ_between_layers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    body = (
        "name: test\nmethod: rtn\nrules:\n"
        f"  - targets: ['re:.*layers\\.0\\.feed_forward\\.experts\\..*']\n    weights: {{bits: 8}}\n"
        f"  - targets: [routed_experts]\n    {EXPERTS_W4}\n"
    )
    plan = plan_for(tiny_checkpoint, write_recipe(tmp_path, body))
    by_layer = {(item.module.layer, item.scheme) for item in plan.quantized() if item.module.expert is not None}
    assert by_layer == {(0, Scheme(8, None)), (1, Scheme(4, 128)), (2, Scheme(4, 128)), (3, Scheme(4, 128))}


@pytest.mark.parametrize(
    ("targets", "group_size", "named"),
    [
        ("routed_experts", 256, "feed_forward.experts.gate_up_proj"),  # gate/up take 128 inputs
        ("attention", 96, "self_attn.q_proj.weight"),
        ("vision", 128, "vision_model."),  # the tiny vision tower is 32 wide
    ],
)
def test_group_size_must_divide_input_features(
    targets: str, group_size: int, named: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    weights = f"weights: {{bits: 4, group_size: {group_size}}}"
    with pytest.raises(ScoutqError, match=f"not a multiple of group_size {group_size}") as raised:
        plan_for(tiny_checkpoint, write_recipe(tmp_path, one_rule(targets, weights=weights)))
    assert named in str(raised.value)


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_refuses_router_recipe_before_writing_anything(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCOUTQ_DEBUG", raising=False)
    recipe = write_recipe(tmp_path, one_rule("routed_experts, router", weights="weights: {bits: 8}"))
    dst = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["quantize", str(tiny_checkpoint), "--recipe", str(recipe), "--out", str(dst)])
    captured = capsys.readouterr()
    assert exited.value.code == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "feed_forward.router.weight" in lines[0] and "Traceback" not in captured.err
    assert not dst.exists()
