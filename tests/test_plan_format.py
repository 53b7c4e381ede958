"""The saved plan is data (SPEC section 9, docs/plan-format.md): versioned, validated in full,
sealed by a digest, checked against its weights, and never a reason to import anything.

The random mutations are in tests/test_plan_fuzz.py; these are the named cases, one reason each.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import attnres_compile as ac
from attnres_compile.errors import PlanFormatError
from attnres_compile.plan import FORMAT, ConversionPlan, read_plan
from attnres_compile.plan.format import json_schema, markdown_fields, plan_digest
from attnres_compile.serving.vllm_plugin import serving_plan

from .models import perturb, rel_err

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "plans"


def sealed(doc: dict) -> dict:
    """`doc` with its digest recomputed: an edit made by someone who knows the format."""
    return {**doc, "digest": plan_digest(doc)}


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32)).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted tiny Llama saved with save_pretrained, and its logits."""
    conv = perturb(ac.convert(tiny_llama(), (IDS,), preserve="exact", num_blocks=2))
    folder = tmp_path_factory.mktemp("plan") / "ckpt"
    conv.save_pretrained(folder)
    with torch.no_grad():
        logits = conv(IDS).logits
    return folder, logits


def with_plan(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose config.json plan is `edit(plan)`."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["attnres"] = edit(copy.deepcopy(config["attnres"]))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- every format this package wrote ---------------------------------------------------------------

@pytest.mark.parametrize("folder", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists()))
def test_a_checkpoint_of_every_earlier_plan_format_loads(folder, tmp_path):
    """Fixtures written by the releases that wrote format 1 (tests/fixtures/plans/README.md)
    load with the logits those releases computed, then save again as the current format."""
    path = FIXTURES / folder
    assert json.loads((path / "config.json").read_text())["attnres"]["version"] == 1
    want = torch.load(path / "expected.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing moved, nothing to say
        model = ac.from_pretrained(path)
    with torch.no_grad():
        assert rel_err(model(want["ids"]).logits, want["logits"]) <= 1e-6
    model.save_pretrained(tmp_path / "again")
    doc = json.loads((tmp_path / "again" / "config.json").read_text())["attnres"]
    assert doc["format"] == FORMAT and "version" not in doc and doc["digest"] == plan_digest(doc)
    assert all(not lk["add"]["file"].startswith("/") for c in doc["chains"] for lk in c["links"])
    again = ac.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert rel_err(again(want["ids"]).logits, want["logits"]) <= 1e-6


def test_a_plan_round_trips_through_json(saved):
    folder, _ = saved
    doc = json.loads((folder / "config.json").read_text())["attnres"]
    assert doc["format"] == FORMAT and doc["digest"].startswith("sha256:")
    plan = read_plan(doc)
    assert plan.to_dict() == doc
    assert read_plan(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("number, match", [
    (3, "format 3, newer than this attnres_compile reads .format 2 and earlier.: upgrade"),
    (0, "format: 0 is no format attnres_compile wrote .formats 1 to 2."),
    ("2", "format: '2' is not a format number"),
    (True, "format: True is not a format number"),
])
def test_another_format_number_is_refused_naming_both(saved, number, match):
    doc = json.loads((saved[0] / "config.json").read_text())["attnres"]
    with pytest.raises(PlanFormatError, match=match) as ei:
        read_plan({**doc, "format": number})
    assert ei.value.field == "format"
    with pytest.raises(PlanFormatError, match="both 'format' and the format-1 field 'version'"):
        read_plan({**doc, "version": 1})
    with pytest.raises(PlanFormatError, match="no 'format' field"):
        read_plan({k: v for k, v in doc.items() if k != "format"})


# -- schema, relations, digest ------------------------------------------------------------------------

def _site(doc, j=1):
    return doc["chains"][0]["sites"][j]


SCHEMA_CASES = [
    ("eps 1e9", lambda d: _site(d).update(eps=1e9), r"chains\[0\]\.sites\[1\]\.eps: Input should be less than or equal to 0.1"),
    ("10,000 blocks", lambda d: d["chains"][0].update(block_size=10_000), r"chains\[0\]\.block_size: Input should be less than or equal to 4096"),
    ("negative line", lambda d: d["chains"][0]["links"][0]["add"].update(line=-3), r"links\[0\]\.add\.line: Input should be greater than or equal to 1"),
    ("string for int", lambda d: d["chains"][0].update(dim="16"), r"chains\[0\]\.dim: Input should be a valid integer"),
    ("bool for int", lambda d: d["chains"][0]["links"][0]["add"].update(stream_arg=True), r"add\.stream_arg: Input should be a valid integer \(got true\)"),
    ("None for float", lambda d: _site(d).update(scale=None), r"sites\[1\]\.scale: Input should be a valid number"),
    ("missing field", lambda d: d["chains"][0].pop("owner"), r"chains\[0\]\.owner: Field required"),
    ("unknown field", lambda d: d.update(extra=1), r"field extra: Unexpected keyword argument"),
    ("empty chains", lambda d: d.update(chains=[]), r"field chains: List should have at least 1 item"),
    ("absolute file", lambda d: d["chains"][0]["links"][0]["add"].update(file="/etc/passwd"), r"add\.file: Value error, must be a path relative"),
    ("parent file", lambda d: d["chains"][0]["links"][0]["add"].update(file="../x.py"), r"add\.file: Value error, must not leave"),
    ("dtype", lambda d: _site(d).update(dtype="int8"), r"sites\[1\]\.dtype: Value error, must be one of float16"),
    ("device", lambda d: _site(d).update(device="not a device"), r"sites\[1\]\.device: Value error"),
    ("huge example tensor", lambda d: d["inputs"]["args"][0].update(tensor=[1 << 20, 1 << 20]), r"inputs: Value error, an example tensor of shape"),
    ("input dtype", lambda d: d["inputs"]["args"][0].update(dtype="load"), r"inputs\.args\[0\]\.tensor\.dtype: Input should be"),
    ("options eps", lambda d: d["options"].update(eps=10.0), r"options\.eps: Input should be less than or equal to 0.1"),
    ("source name", lambda d: _site(d)["schedule"].update(sources=["b0", "x"]), r"schedule\.sources\[1\]: String should match pattern"),
    ("a list", lambda d: d.update(model=[]), r"field model: Input should be a valid string"),
    ("scale 1e9 (loaded and ran silently before)", lambda d: _site(d).update(scale=1e9),
     r"sites\[1\]\.scale: Input should be less than or equal to 4097"),
]


@pytest.mark.parametrize("name, edit, match", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_the_schema_refuses_a_bad_field_naming_it(saved, name, edit, match):
    doc = json.loads((saved[0] / "config.json").read_text())["attnres"]
    edit(doc)
    for candidate in (doc, sealed(doc)):  # refused by the schema, digest or not
        with pytest.raises(PlanFormatError, match=match) as ei:
            read_plan(candidate)
        assert ei.value.field and ei.value.field in str(ei.value)


RELATION_CASES = [
    ("scale 1000", lambda d: _site(d).update(scale=1000.0), "sites[1].scale",
     r"sites\[1\]\.scale: 1000.0, but preserve='exact' over 2 source\(s\) gives 2.0"),
    ("scale of the paper's mode", lambda d: _site(d).update(scale=1.0), "sites[1].scale", "gives 2.0"),
    ("block size", lambda d: d["chains"][0].update(block_size=1), "sites[1].schedule",
     r"block size 1 over 4 sublayers gives sublayer 1, block 2, sources \['b0', 'b1'\]"),
    ("chain index", lambda d: d["chains"][0].update(index=3), "chains[0].index", "3, but it is chain 0"),
    ("site count", lambda d: d["chains"][0]["sites"].pop(), "chains[0].sites", "4 sites for 4 sublayers"),
    ("site name", lambda d: _site(d).update(name="site3"), "sites[1].name", "expected 'site1'"),
    ("width", lambda d: _site(d).update(dim=32), "sites[1].dim", "its chain's dim is 16"),
    ("parameter name", lambda d: _site(d).update(param_prefix="attnres.chain0.site2"), "sites[1].param_prefix",
     "expected 'attnres.chain0.site1'"),
    ("identity site with parameters", lambda d: _site(d, 0).update(param_prefix="attnres.chain0.site0"),
     "sites[0].param_prefix", "expected None"),
    ("sublayer", lambda d: _site(d).update(module="model.layers.1.mlp"), "sites[1].module",
     "sublayer 1 is 'model.layers.0.mlp'"),
]


@pytest.mark.parametrize("name, edit, field, match", RELATION_CASES, ids=[c[0] for c in RELATION_CASES])
def test_fields_that_disagree_are_refused_naming_the_field(saved, name, edit, field, match):
    doc = json.loads((saved[0] / "config.json").read_text())["attnres"]
    edit(doc)
    with pytest.raises(PlanFormatError, match=match) as ei:
        read_plan(sealed(doc))
    assert ei.value.field.endswith(field) and ei.value.field in str(ei.value)


def test_an_edit_that_leaves_the_digest_is_refused(saved, tmp_path):
    """A legal value edited after saving (another eps, lasti, version string) fails the digest."""
    folder, _ = saved
    for k, edit in enumerate([lambda d: _site(d).update(eps=1e-3),
                              lambda d: d["chains"][0]["links"][0]["add"].update(lasti=None),
                              lambda d: d["versions"].update(torch="9.9.9")]):
        bad = with_plan(folder, tmp_path / f"edit{k}", lambda d: (edit(d), d)[1])
        with pytest.raises(PlanFormatError, match="field digest: the plan says sha256:.*: the plan was edited or "
                                                  "damaged after it was saved") as ei:
            ac.from_pretrained(bad)
        assert ei.value.field == "digest"
    doc = json.loads((folder / "config.json").read_text())["attnres"]
    for bad in ({k: v for k, v in doc.items() if k != "digest"}, {**doc, "digest": 7}):
        with pytest.raises(PlanFormatError, match="field digest"):
            read_plan(bad)


def test_a_resealed_plan_whose_eps_disagrees_with_the_weights_is_refused(saved, tmp_path):
    """The weights carry the layout they were trained for (eps included), so an edited plan
    sealed again still cannot load under them."""
    folder, _ = saved
    bad = with_plan(folder, tmp_path / "eps", lambda d: (_site(d).update(eps=1e-3), sealed(d))[1])
    with pytest.raises(PlanFormatError, match=r"do not fit the plan in config.json: the layout saved with the weights "
                                              r"differs: chain 0, site site1: eps 1e-06 in the file, 0.001 here"):
        ac.from_pretrained(bad)


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _layout_bytes(doc: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(doc).encode()), dtype=torch.uint8)


WEIGHT_CASES = [
    ("missing", lambda t: t.pop("attnres.chain0.site3.query"),
     "the plan needs the AttnRes tensor attnres.chain0.site3.query, which the weights lack"),
    ("extra", lambda t: t.update({"attnres.chain0.site9.query": torch.zeros(16)}),
     "the weights hold the AttnRes tensor attnres.chain0.site9.query, which the plan has no site for"),
    ("shape", lambda t: t.update({"attnres.chain0.final.norm_weight": torch.ones(8)}),
     r"attnres.chain0.final.norm_weight: shape \[8\] in the weights, \[16\] in the plan"),
    ("dtype", lambda t: t.update({"attnres.chain0.site1.query": torch.zeros(16, dtype=torch.int64)}),
     "attnres.chain0.site1.query: dtype I64 in the weights; AttnRes parameters are floating point"),
    ("NaN", lambda t: t["attnres.chain0.site2.query"].fill_(float("nan")),
     "the AttnRes tensor attnres.chain0.site2.query holds NaN or infinite values"),
    ("layout bytes", lambda t: t.update({"attnres._extra_state": torch.tensor([123, 34, 0, 255], dtype=torch.uint8)}),
     r"attnres._extra_state: not the JSON of an AttnRes layout"),
    ("layout field", lambda t: t.update({"attnres._extra_state": _layout_bytes(
        {"model": "LlamaForCausalLM", "preserve": "exact", "chains": [{"block_size": "2", "num_sublayers": 4, "sites": {}}]})}),
     r"the AttnRes layout.s field attnres._extra_state.chains\[0\].block_size: Input should be a valid integer"),
    ("layout of another block size", lambda t: t.update({"attnres._extra_state": _layout_bytes(
        {"model": "LlamaForCausalLM", "preserve": "exact",
         "chains": [{"block_size": 4, "num_sublayers": 4, "sites": {"site1": 2, "site2": 2, "site3": 3, "final": 3}}]})}),
     "chain 0: block_size 4 in the file, 2 here"),
    ("layout as floats", lambda t: t.update({"attnres._extra_state": torch.zeros(3)}),
     r"attnres._extra_state is a torch.float32 tensor of shape \[3\]"),
]


@pytest.mark.parametrize("name, edit, match", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_weights_that_disagree_with_the_plan_are_refused_naming_the_first_difference(saved, tmp_path, name, edit,
                                                                                     match):
    bad = _edit_weights(saved[0], tmp_path / "w", edit)
    with pytest.raises(PlanFormatError, match=match):
        ac.from_pretrained(bad)
    if name != "NaN":  # the engine process reads names, shapes and layout only; vLLM's loader checks values
        with pytest.raises(PlanFormatError, match=match):
            serving_plan(bad)


def test_a_folder_without_a_plan_is_a_plain_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(PlanFormatError, match="no 'attnres' section: it was not saved from a model converted"):
        ac.from_pretrained(tmp_path / "plain")


def test_a_plan_for_another_architecture_names_the_first_difference(saved, tmp_path):
    """A plan whose modules another class lacks: refused before anything is installed."""
    folder, _ = saved
    with pytest.raises(PlanFormatError, match="made for LlamaForCausalLM, not MistralForCausalLM"):
        from transformers import MistralForCausalLM

        ac.from_pretrained(folder, model_class=MistralForCausalLM)


# -- nothing a plan names is imported ----------------------------------------------------------------

SENTINEL = "attnres_sentinel_module"


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A module on sys.path (as a notebook's working directory would be) whose import leaves a mark."""
    mark = tmp_path / "imported"
    (tmp_path / f"{SENTINEL}.py").write_text(f"open({str(mark)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield mark
    assert SENTINEL not in sys.modules and not mark.exists(), "a module named by a checkpoint was imported"


@pytest.mark.parametrize("name", [SENTINEL, "this", "antigravity"])
def test_a_plan_naming_a_foreign_module_is_refused_before_any_import(saved, tmp_path, sentinel, name):
    """The Zen of Python printed on loading a checkpoint (issue 29): every module a plan names is
    checked against the modules of the model's own classes, and none is imported."""
    folder, _ = saved
    before = set(sys.modules)

    def foreign(d):
        for c in d["chains"]:
            for lk in c["links"]:
                lk["add"]["module_name"] = name
        return sealed(d)

    bad = with_plan(folder, tmp_path / "foreign", foreign)
    match = (rf"field chains\[0\]\.links\[0\]\.add\.module_name: '{name}' is not the module of any class of the "
             r"model \(they are in transformers.*\); a plan finds code only through the model's own classes")
    with pytest.raises(PlanFormatError, match=match):
        ac.from_pretrained(bad)
    with pytest.raises(PlanFormatError, match=match):
        ac.apply_plan(tiny_llama(), json.loads((bad / "config.json").read_text())["attnres"])
    with pytest.raises(PlanFormatError, match=match):
        serving_plan(bad)
    assert name not in set(sys.modules) - before


def test_a_plan_naming_a_file_outside_the_models_classes_is_refused(saved, tmp_path, sentinel):
    folder, _ = saved

    def file_only(d):
        add = d["chains"][0]["links"][1]["add"]
        add["module_name"], add["file"] = None, f"{SENTINEL}.py"
        return sealed(d)

    bad = with_plan(folder, tmp_path / "file", file_only)
    with pytest.raises(PlanFormatError, match=rf"chains\[0\]\.links\[1\]\.add\.file: '{SENTINEL}.py' is not the "
                                              r"source file of any class of the model"):
        ac.from_pretrained(bad)


def test_the_models_own_file_named_without_its_module_is_found(saved, tmp_path):
    """A plan whose module is unknown (module_name null) finds its file among the classes' files."""
    folder, logits = saved

    def no_module(d):
        for c in d["chains"]:
            for lk in c["links"]:
                lk["add"]["module_name"] = None
        return sealed(d)

    model = ac.from_pretrained(with_plan(folder, tmp_path / "nomod", no_module))
    with torch.no_grad():
        assert rel_err(model(IDS).logits, logits) <= 1e-6


# -- the docs are generated from the schema ------------------------------------------------------------

def test_docs_hold_the_generated_field_table_and_schema():
    page = (ROOT / "docs" / "plan-format.md").read_text()
    start, end = "<!-- fields: generated by python -m attnres_compile.plan -->", "<!-- end of fields -->"
    assert start in page and end in page
    table = page.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_fields(ConversionPlan), "regenerate: python -m attnres_compile.plan"
    schema = json.loads((ROOT / "docs" / "plan-format.schema.json").read_text())
    assert schema == json.loads(json.dumps(json_schema(ConversionPlan))), \
        "regenerate: python -m attnres_compile.plan --schema > docs/plan-format.schema.json"


def test_convert_takes_options_within_the_ranges_a_saved_plan_holds():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"eps must be in \[1e-30, 0.1\] \(the range a saved plan holds\), got 0.5"):
        ac.convert(model, (IDS,), eps=0.5)
    with pytest.raises(ValueError, match=r"num_blocks must be <= 4096 \(the most a saved plan holds\), got 10000"):
        ac.convert(model, (IDS,), num_blocks=10_000)
