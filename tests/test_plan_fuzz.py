"""Random mutations of saved plans, and of the AttnRes weights beside them (issue 29).

Invariant, for every case: loading either gives the saved model's outputs, or raises the
library's own error (an AttnResError) whose message names the field (PlanFormatError carries
it in `.field`); never another exception, never a hang, never different outputs, and never an
import of a module the plan names (a sentinel module on sys.path records being imported, and
sys.modules gains no name the plan holds).

Subjects, each with its loader:

* `hf`: a converted tiny Llama saved with save_pretrained (the current format), loaded with
  `attnres_compile.from_pretrained`;
* `hf-format1`: the format-1 fixture written by an earlier release (tests/fixtures/plans), the
  same loader;
* `vllm`: the `hf` folder through the vLLM plugin's loader (`serving_plan`: what the engine's
  first process runs), its plan then installed on the folder's model with the folder's weights;
* `plain`: a converted plain-PyTorch LM, its plan (`plan.to_dict()`) installed with
  `attnres_compile.apply_plan` and its weights from `save_attnres` loaded with
  `load_attnres_state_dict`.

A case edits 1-3 fields of the plan (delete it; set it to a string, a negative number, None,
10**9, an empty list or object, a bool, the sentinel's module or file name, another field's
value; an int plus one, a float times ten), then half the time seals the edit with a fresh
digest (as someone who knows the format would), or edits the weights instead (drop, add,
reshape or retype an AttnRes tensor, NaN values, garbage or another layout in
`attnres._extra_state`). Format 1 had no digest and its weights' layout no eps, so a legal
edit of a site's eps there is undetectable (the reason for format 2): the `hf-format1`
subject's edits exclude scaling a float.

The default run draws FUZZ_CASES cases (CI); the slow one 2,400 (docs/plan-format.md quotes its
counts, written to $ATTNRES_PLAN_FUZZ_REPORT when set).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import attnres_compile as ac
from attnres_compile.errors import AttnResError, PlanFormatError
from attnres_compile.plan.format import plan_digest
from attnres_compile.serving.vllm_plugin import serving_plan

from .models import TinyPreNormLM, perturb, rel_err
from .test_plan_format import FIXTURES, IDS, tiny_llama

FUZZ_CASES = 100
SLOW_CASES = 2400
SENTINEL = "attnres_fuzz_sentinel"
TIMEOUT_S = 120
SUBJECTS = ("hf", "hf-format1", "vllm", "plain")


class Subject:
    def __init__(self, name, folder=None, doc=None, weights=None, build=None, want=None):
        self.name, self.folder, self.doc, self.weights, self.build, self.want = name, folder, doc, weights, build, want


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    conv = perturb(ac.convert(tiny_llama(), (IDS,), preserve="exact", num_blocks=2))
    conv.save_pretrained(root / "hf")
    with torch.no_grad():
        want_hf = conv(IDS).logits
    shutil.copytree(FIXTURES / "format1_llama", root / "hf-format1")
    want_f1 = torch.load(root / "hf-format1" / "expected.pt")
    torch.manual_seed(0)
    base = TinyPreNormLM(layers=3).eval()
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(3))
    plain = perturb(ac.convert(base, (idx,), num_blocks=2))
    ac.save_attnres(plain, root / "plain.safetensors")
    with torch.no_grad():
        want_plain = plain(idx)
    return {
        "hf": Subject("hf", root / "hf", want=(IDS, want_hf)),
        "hf-format1": Subject("hf-format1", root / "hf-format1", want=(want_f1["ids"], want_f1["logits"])),
        "vllm": Subject("vllm", root / "hf", want=(IDS, want_hf)),
        "plain": Subject("plain", doc=plain.attnres.plan.to_dict(), weights=root / "plain.safetensors",
                         build=lambda: copy.deepcopy(base), want=(idx, want_plain)),
    }


# -- mutations --------------------------------------------------------------------------------------

def _paths(node, prefix=()):
    """Every position in a JSON document: dict keys and list items, at every depth."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _leaves(doc):
    return [p for p in _paths(doc) if not isinstance(_get(doc, p), (dict, list))]


def _mutate_once(doc, rng: random.Random, scale_floats: bool) -> str:
    path = rng.choice(_paths(doc))
    parent, key = _get(doc, path[:-1]), path[-1]
    value = parent[key]
    ops = ["delete", "string", "negative", "float negative", "none", "huge", "empty list", "empty object", "true",
           "sentinel module", "sentinel file", "other value"]
    if isinstance(value, int) and not isinstance(value, bool):
        ops.append("plus one")
    if isinstance(value, float) and scale_floats:
        ops.append("times ten")
    if isinstance(value, list) and value:
        ops += ["drop item", "repeat item"]
    op = rng.choice(ops)
    new = {"string": "x", "negative": -1, "float negative": -7.5, "none": None, "huge": 10**9, "empty list": [],
           "empty object": {}, "true": True, "sentinel module": SENTINEL, "sentinel file": f"{SENTINEL}.py"}.get(op)
    if op == "delete":
        if isinstance(parent, list):
            parent.pop(key)
        else:
            del parent[key]
    elif op == "plus one":
        parent[key] = value + 1
    elif op == "times ten":
        parent[key] = value * 10
    elif op == "other value":
        parent[key] = copy.deepcopy(_get(doc, rng.choice(_leaves(doc))))
    elif op == "drop item":
        value.pop(rng.randrange(len(value)))
    elif op == "repeat item":
        value.append(copy.deepcopy(rng.choice(value)))
    else:
        parent[key] = new
    return f"{op} at {'.'.join(map(str, path))}"


def mutate_plan(doc: dict, rng: random.Random, *, format1: bool) -> tuple[dict, str]:
    doc = copy.deepcopy(doc)
    what = [_mutate_once(doc, rng, scale_floats=not format1) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    if not format1 and rng.random() < 0.5 and isinstance(doc, dict):
        try:
            doc["digest"] = plan_digest(doc)
            what.append("sealed")
        except (TypeError, ValueError):  # only for documents that are not JSON data
            pass
    return doc, "; ".join(what)


def _layout_blob(rng: random.Random, layout: dict) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if choice == 1:
        return json.dumps(layout)[: rng.randrange(1, 30)].encode()
    other = copy.deepcopy(layout)
    chain = other["chains"][0]
    if choice == 2:
        chain["block_size"] = chain.get("block_size", 1) + 1
    else:
        chain.setdefault("eps", {})
        for k in chain.get("sites", {}):
            chain["eps"][k] = 0.05
    return json.dumps(other).encode()


def mutate_weights(tensors: dict, rng: random.Random) -> str:
    names = sorted(k for k in tensors if k.startswith("attnres.") and k != "attnres._extra_state")
    name = rng.choice(names)
    op = rng.choice(["drop", "extra", "reshape", "int dtype", "nan", "layout"])
    if op == "drop":
        del tensors[name]
    elif op == "extra":
        tensors[name.replace("query", "gate").replace("norm_weight", "bias")] = torch.zeros(3)
    elif op == "reshape":
        tensors[name] = tensors[name][: max(1, tensors[name].shape[0] // 2)].clone()
    elif op == "int dtype":
        tensors[name] = tensors[name].to(torch.int32)
    elif op == "nan":
        tensors[name] = tensors[name].clone().fill_(float("nan"))
    else:
        layout = json.loads(bytes(tensors["attnres._extra_state"].tolist()).decode()) \
            if "attnres._extra_state" in tensors else {"model": "X", "preserve": "exact", "chains": [{}]}
        blob = _layout_blob(rng, layout)
        tensors["attnres._extra_state"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
        name = "attnres._extra_state"
    return f"weights: {op} {name}"


# -- one case ---------------------------------------------------------------------------------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _run_case(subject: Subject, rng: random.Random, work: Path) -> tuple[str, str, str, dict | None]:
    """(outcome, what was mutated, detail, the mutated plan) for one random case."""
    weights_case = rng.random() < 0.3
    format1 = subject.name == "hf-format1"
    if subject.folder is not None:
        folder = work / "case"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(subject.folder, folder)
        config = json.loads((folder / "config.json").read_text())
        if weights_case:
            tensors = load_file(folder / "model.safetensors")
            what = mutate_weights(tensors, rng)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            doc = config["attnres"]
        else:
            doc, what = mutate_plan(config["attnres"], rng, format1=format1)
            config["attnres"] = doc
            (folder / "config.json").write_text(json.dumps(config))
    else:
        weights = subject.weights
        if weights_case:
            tensors = load_file(weights)
            what = mutate_weights(tensors, rng)
            weights = work / "case.safetensors"
            from safetensors import safe_open

            with safe_open(str(subject.weights), framework="pt") as f:
                meta = f.metadata()
            if "weights: layout" in what:
                meta = {"attnres_layout": bytes(tensors.pop("attnres._extra_state").tolist()).decode("latin-1")}
            save_file(tensors, weights, metadata=meta)
            doc = subject.doc
        else:
            doc, what = mutate_plan(subject.doc, rng, format1=False)

    x, want = subject.want
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if subject.name in ("hf", "hf-format1"):
                model = ac.from_pretrained(folder)
            elif subject.name == "vllm":
                plan, _ = serving_plan(folder)
                from transformers import AutoConfig, LlamaForCausalLM

                model = LlamaForCausalLM.from_pretrained(folder, config=AutoConfig.from_pretrained(folder))
                ac.apply_plan(model, plan)
                state = {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("attnres.")}
                ac.load_attnres_state_dict(model, {k: v for k, v in state.items() if k != "attnres._extra_state"})
            else:
                model = ac.apply_plan(subject.build(), doc)
                ac.load_attnres_state_dict(model, weights)
            with torch.no_grad():
                out = model(x)
            got = out.logits if hasattr(out, "logits") else out
        same = got.shape == want.shape and bool(torch.isfinite(got).all()) and rel_err(got, want) <= 1e-5
        return ("loaded, same outputs" if same else "loaded, DIFFERENT outputs"), what, "", doc
    except _Timeout:
        return "HANG", what, f"no answer in {TIMEOUT_S} s", doc
    except PlanFormatError as exc:
        named = bool(exc.field) and exc.field in str(exc)
        return ("refused, field named" if named else "refused, FIELD NOT NAMED"), what, str(exc)[:300], doc
    except AttnResError as exc:
        return f"refused ({type(exc).__name__})", what, str(exc)[:300], doc
    except Exception:  # noqa: BLE001 -- what this test exists to find
        return "RAW EXCEPTION", what, traceback.format_exc(limit=-4)[-1500:], doc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _strings(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) | {str(k)} for k, v in node.items())) if node else set()
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node)) if node else set()
    return {node} if isinstance(node, str) else set()


BAD = ("DIFFERENT", "NOT NAMED", "HANG", "RAW", "IMPORTED")


def run_fuzz(subjects, cases: int, seed: int, work: Path, sentinel_dir: Path) -> dict:
    sentinel_dir.mkdir(parents=True, exist_ok=True)
    (sentinel_dir / f"{SENTINEL}.py").write_text(f"open({str(sentinel_dir / 'imported')!r}, 'w').write('x')\n")
    sys.path.insert(0, str(sentinel_dir))
    counts: dict[str, Counter] = {s: Counter() for s in SUBJECTS}
    failures, examples = [], {}
    try:
        rng = random.Random(seed)
        for i in range(cases):
            subject = subjects[SUBJECTS[i % len(SUBJECTS)]]
            before = set(sys.modules)
            outcome, what, detail, doc = _run_case(subject, rng, work)
            imported = (set(sys.modules) - before) & (_strings(doc) | {SENTINEL})
            if imported or (sentinel_dir / "imported").exists():
                outcome = f"IMPORTED {sorted(imported) or [SENTINEL]}"
            counts[subject.name][outcome] += 1
            examples.setdefault(outcome, (subject.name, what, detail))
            if any(b in outcome for b in BAD):
                failures.append((i, subject.name, outcome, what, detail))
    finally:
        sys.path.remove(str(sentinel_dir))
    totals = Counter()
    for c in counts.values():
        totals.update(c)
    return {"cases": cases, "seed": seed, "totals": dict(totals), "by_subject": {k: dict(v) for k, v in counts.items()},
            "examples": {k: list(v) for k, v in examples.items()}, "failures": failures}


def _check(report):
    assert not report["failures"], "\n\n".join(
        f"case {i} ({s}): {o}\n  mutation: {w}\n  {d}" for i, s, o, w, d in report["failures"][:8])
    assert sum(v for k, v in report["totals"].items() if k.startswith("refused")) > report["cases"] // 3
    assert report["totals"].get("loaded, same outputs", 0) > 0


def test_fuzzed_plans_load_as_saved_or_are_refused_naming_the_field(subjects, tmp_path):
    report = run_fuzz(subjects, FUZZ_CASES, seed=29, work=tmp_path, sentinel_dir=tmp_path / "sentinel")
    _check(report)


@pytest.mark.slow
def test_fuzzed_plans_slow(subjects, tmp_path):
    report = run_fuzz(subjects, SLOW_CASES, seed=2029, work=tmp_path, sentinel_dir=tmp_path / "sentinel")
    out = os.environ.get("ATTNRES_PLAN_FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=1, default=str))
    _check(report)
