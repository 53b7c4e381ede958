"""The saved plan: a versioned, validated data format (docs/plan-format.md).

A converted model's plan travels as JSON: in a Hugging Face checkpoint's `config.json` (the
`attnres` section), in vLLM's engine arguments, wherever a user keeps `plan.to_dict()`. It is
data from whoever wrote the file, so reading one

1. reads its `format` number: a format this package wrote earlier is migrated to the current
   one (format 1 had a `version` field and no digest), a newer or unknown one is refused naming
   both;
2. validates the whole document against the schema, which is the annotations of the plan's
   data classes (plan/types.py: types, ranges, allowed values), strictly (no coercion: "3" is
   not 3, true is not 1);
3. checks the relations between fields: chain and site indices, each site's sources against the
   block schedule of its chain, its scale against `preserve`, its parameter name, width and
   sublayer against its chain;
4. checks the digest: the SHA-256 of the document's canonical JSON without the `digest` field,
   written when the plan is saved, so that a plan edited or damaged afterwards is refused.

Every failure is a PlanFormatError naming the field (`chains[0].sites[3].eps`). Nothing in a
plan is imported or run: code is found only through the classes of the model the user built
(runtime/replay.py).

The weights saved beside a plan carry its layout (`attnres._extra_state` in a state_dict, the
`attnres_layout` metadata of `save_attnres`): the chains, their sublayer counts and block sizes,
each site's source count and eps. `weights_difference` compares a plan with the AttnRes tensors
and layout of a checkpoint and names the first difference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from ..errors import PlanFormatError
from .limits import MAX_CHAINS, MAX_DIM, MAX_EPS, MAX_SUBLAYERS, MIN_EPS
from .fields import STRICT, Identifier, SiteName
from .schedule import block_schedule

FORMAT = 2
"""The format this package writes."""

HISTORY = {
    1: "written by attnres_compile 0.1.0 before the format was versioned as data: a `version: 1` field, no digest; "
       "early ones have absolute `file` paths and lack `cols`, `options`, `inputs` and `versions`",
    2: "a `format` field, a `digest`, the schema of plan/types.py and relations checked on reading",
}

_DIGEST = "sha256:"


# -- writing --------------------------------------------------------------------------------------

@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def canonical_json(doc: dict) -> str:
    """The document as the digest reads it: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def plan_digest(doc: dict) -> str:
    """`sha256:<hex>` of the canonical JSON of `doc` without its `digest` field."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return _DIGEST + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def to_document(plan) -> dict:
    """The JSON-ready saved form of `plan` (a ConversionPlan): its fields, `format` and
    `digest`. Read back before it is returned, so that every plan written can be loaded."""
    doc = {"format": FORMAT, **_adapter(type(plan)).dump_python(plan, mode="json")}
    doc["digest"] = plan_digest(doc)
    read_document(doc, type(plan))
    return doc


# -- reading --------------------------------------------------------------------------------------

def read_document(doc, cls):
    """The plan (an instance of `cls`, the ConversionPlan class of plan/types.py) a saved
    document holds, validated in full (see the module doc).

    Raises PlanFormatError naming the field at fault."""
    if not isinstance(doc, dict):
        raise PlanFormatError(f"the attnres plan is a {type(doc).__name__}, not a JSON object with 'format' and "
                              "'chains'", field="")
    number = _format_of(doc)
    body = _MIGRATIONS[number](doc) if number != FORMAT else {k: v for k, v in doc.items() if k != "format"}
    body.pop("digest", None)
    try:
        text = json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as exc:  # only for documents that did not come from JSON
        raise PlanFormatError(f"the attnres plan is not JSON data: {exc}", field="") from None
    try:
        plan = _adapter(cls).validate_json(text, strict=True)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    check_relations(plan)
    if number >= 2:
        _check_digest(doc)
    return plan


def _format_of(doc: dict) -> int:
    if "format" in doc and "version" in doc:
        raise PlanFormatError("the attnres plan has both 'format' and the format-1 field 'version'", field="format")
    if "format" in doc:
        number = doc["format"]
    elif "version" in doc:
        number = doc["version"]
        if number != 1:
            raise PlanFormatError(f"the attnres plan's field version: {number!r}; the plans that carried a 'version' "
                                  "field are format 1", field="version")
    else:
        raise PlanFormatError("the attnres plan has no 'format' field (nor the format-1 field 'version')", field="format")
    if isinstance(number, bool) or not isinstance(number, int):
        raise PlanFormatError(f"the attnres plan's field format: {number!r} is not a format number", field="format")
    if number > FORMAT:
        raise PlanFormatError(f"the attnres plan is format {number}, newer than this attnres_compile reads (format "
                              f"{FORMAT} and earlier): upgrade attnres_compile to load it", field="format")
    if number not in _MIGRATIONS and number != FORMAT:
        raise PlanFormatError(f"the attnres plan's field format: {number} is no format attnres_compile wrote "
                              f"(formats 1 to {FORMAT})", field="format")
    return number


def _check_digest(doc: dict) -> None:
    saved = doc.get("digest")
    if not isinstance(saved, str) or not saved.startswith(_DIGEST):
        raise PlanFormatError(f"the attnres plan's field digest: {saved!r}; a format-{FORMAT} plan carries the "
                              "'sha256:...' digest of its content", field="digest")
    actual = plan_digest(doc)
    if saved != actual:
        raise PlanFormatError(f"the attnres plan's field digest: the plan says {saved[:23]}..., its content hashes "
                              f"to {actual[:23]}...: the plan was edited or damaged after it was saved", field="digest")


def _schema_error(exc: ValidationError) -> PlanFormatError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = field_path(first["loc"])
    got = first.get("input")
    shown = "" if first["type"] == "missing" else f" (got {_short(got)})"
    more = f"; {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
    return PlanFormatError(f"the attnres plan's field {path or '(document)'}: {first['msg']}{shown}{more}", field=path)


def field_path(loc) -> str:
    """("chains", 0, "sites", 3, "eps") -> "chains[0].sites[3].eps"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_relations(plan) -> None:
    """What the schema cannot say: fields that must agree with each other."""
    for ci, c in enumerate(plan.chains):
        at = f"chains[{ci}]"
        if c.index != ci:
            raise PlanFormatError(f"the attnres plan's field {at}.index: {c.index}, but it is chain {ci}",
                                  field=f"{at}.index")
        if len(c.sites) != len(c.links) + 1:
            raise PlanFormatError(f"the attnres plan's field {at}.sites: {len(c.sites)} sites for {len(c.links)} "
                                  f"sublayers; a chain has one site per sublayer and a final site",
                                  field=f"{at}.sites")
        expected = block_schedule(len(c.links), c.block_size)
        for j, (s, want) in enumerate(zip(c.sites, expected)):
            sat = f"{at}.sites[{j}]"
            final = j == len(c.links)
            name = "final" if final else f"site{j}"
            checks = (
                ("chain", s.chain, ci),
                ("name", s.name, name),
                ("schedule", s.schedule, want),
                ("module", s.module, "" if final else c.links[j].sublayer),
                ("dim", s.dim, c.dim),
                ("param_prefix", s.param_prefix, None if want.num_sources == 1 else f"attnres.chain{ci}.{name}"),
                ("scale", s.scale, float(want.num_sources) if plan.preserve == "exact" else 1.0),
            )
            for key, got, should in checks:
                if got != should:
                    if key == "schedule":
                        why = f"block size {c.block_size} over {len(c.links)} sublayers gives {_schedule_text(should)}"
                    else:
                        why = {"scale": f"preserve={plan.preserve!r} over {want.num_sources} source(s) gives {should}",
                               "module": f"sublayer {j} is {should!r}",
                               "dim": f"its chain's dim is {should}"}.get(key, f"expected {should!r}")
                    shown = _schedule_text(got) if key == "schedule" else repr(got)
                    raise PlanFormatError(f"the attnres plan's field {sat}.{key}: {shown}, but {why}",
                                          field=f"{sat}.{key}")


def _schedule_text(s) -> str:
    return f"sublayer {s.sublayer}, block {s.block}, sources {list(s.sources)}"


# -- migrations from formats this package wrote earlier ---------------------------------------------

def _from_format_1(doc: dict) -> dict:
    """Format 1 (see HISTORY): `version` instead of `format`, no digest; early plans stored
    absolute `file` paths (kept as the file name) and lacked `cols`, `options`, `inputs`,
    `versions`. Structure it cannot read is left as it is, for the schema to name."""
    body = {k: v for k, v in doc.items() if k != "version"}
    body.setdefault("python", "")
    chains = body.get("chains")
    if isinstance(chains, list):
        for c in chains:
            links = c.get("links") if isinstance(c, dict) else None
            for lk in links if isinstance(links, list) else ():
                if not isinstance(lk, dict):
                    continue
                absorbed = lk.get("absorbed")
                for add in [lk.get("add"), *(absorbed if isinstance(absorbed, list) else ())]:
                    f = add.get("file") if isinstance(add, dict) else None
                    if isinstance(f, str) and os.path.isabs(f):
                        add["file"] = os.path.basename(f)
        if "options" not in body:
            sizes = {c.get("block_size") for c in chains if isinstance(c, dict)}
            if len(sizes) == 1:  # re-derivation needs the block size it was made with
                body["options"] = {"block_size": sizes.pop()}
    return body


_MIGRATIONS = {1: _from_format_1}


# -- the layout saved with the weights --------------------------------------------------------------

class _ChainLayout(TypedDict):
    __pydantic_config__ = STRICT
    block_size: Annotated[int, Field(ge=1, le=MAX_SUBLAYERS)]
    num_sublayers: Annotated[int, Field(ge=1, le=MAX_SUBLAYERS)]
    sites: dict[SiteName, Annotated[int, Field(ge=2, le=MAX_SUBLAYERS + 1)]]
    dim: NotRequired[Annotated[int, Field(ge=1, le=MAX_DIM)]]
    eps: NotRequired[dict[SiteName, Annotated[float, Field(ge=MIN_EPS, le=MAX_EPS)]]]


class WeightsLayout(TypedDict):
    """What a set of AttnRes weights was made for (`eps` and `dim` since format 2)."""
    __pydantic_config__ = STRICT
    model: Identifier
    preserve: Literal["scale", "exact"]
    chains: Annotated[list[_ChainLayout], Field(min_length=1, max_length=MAX_CHAINS)]




def plan_layout(plan) -> dict:
    """The layout a plan's AttnRes weights carry."""
    return {
        "model": plan.model,
        "preserve": plan.preserve,
        "chains": [
            {"block_size": c.block_size, "num_sublayers": len(c.links), "dim": c.dim,
             "sites": {s.name: s.schedule.num_sources for s in c.sites if s.param_prefix},
             "eps": {s.name: s.eps for s in c.sites if s.param_prefix}}
            for c in plan.chains
        ],
    }


def read_layout(raw, key: str, origin: str = "") -> dict:
    """A saved layout (JSON text, bytes or a dict) validated. `key` is where it is stored
    (`attnres._extra_state`, `attnres_layout`), `origin` the file it came from (for messages)."""
    where = f"{origin}: {key}" if origin else key
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode()
        doc = json.loads(raw) if isinstance(raw, str) else raw
        text = json.dumps(doc, allow_nan=False)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise PlanFormatError(f"{where}: not the JSON of an AttnRes layout ({exc})", field=key) from None
    try:
        return _adapter(WeightsLayout).validate_json(text, strict=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = field_path(err["loc"])
        field = f"{key}.{path}" if path else key
        raise PlanFormatError(f"{origin + ': ' if origin else ''}the AttnRes layout's field {field}: {err['msg']}",
                              field=field) from None


def layout_difference(saved: dict, mine: dict) -> str | None:
    """The differences between the layout saved with some weights ("the file") and a plan's
    ("here"), first first, or None when the weights fit. Fields a layout of format 1 lacks
    (dim, eps) are not compared."""
    diffs = []
    for i, (a, b) in enumerate(zip(saved["chains"], mine["chains"])):
        for key, what in (("block_size", "block_size {}"), ("num_sublayers", "{} sublayers"), ("dim", "dim {}")):
            if key in a and key in b and a[key] != b[key]:
                diffs.append(f"chain {i}: {what.format(a[key])} in the file, {b[key]} here")
        if "sites" in a and "sites" in b:
            for name in dict.fromkeys((*a["sites"], *b["sites"])):
                x, y = a["sites"].get(name, "no"), b["sites"].get(name, "no")
                if x != y:
                    diffs.append(f"chain {i}, site {name}: {x} sources in the file, {y} here")
        if "eps" in a and "eps" in b:
            for name, e in a["eps"].items():
                if name in b["eps"] and e != b["eps"][name]:
                    diffs.append(f"chain {i}, site {name}: eps {e:g} in the file, {b['eps'][name]:g} here")
    if len(saved["chains"]) != len(mine["chains"]):
        diffs.append(f"{len(saved['chains'])} chains in the file, {len(mine['chains'])} here")
    return "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "") if diffs else None


def expected_tensors(plan) -> dict[str, tuple[int, ...]]:
    """The AttnRes tensors a plan's weights hold (names under `attnres.`), with their shapes."""
    out = {}
    for c in plan.chains:
        for s in c.sites:
            if s.param_prefix:
                out[f"{s.param_prefix}.query"] = (s.dim,)
                out[f"{s.param_prefix}.norm_weight"] = (s.dim,)
    return out


def weights_difference(plan, tensors: dict[str, tuple[tuple[int, ...], str]],
                       layout: dict | None) -> str | None:
    """The first difference between `plan` and a checkpoint's AttnRes weights: `tensors` maps
    each `attnres.*` parameter name to (shape, dtype name), `layout` is the saved layout (None
    where the checkpoint has none). None when they agree."""
    want = expected_tensors(plan)
    for name in want:
        if name not in tensors:
            return f"the plan needs the AttnRes tensor {name}, which the weights lack"
    for name in tensors:
        if name not in want:
            return f"the weights hold the AttnRes tensor {name}, which the plan has no site for"
    for name, shape in want.items():
        got, dtype = tensors[name]
        if tuple(got) != shape:
            return f"{name}: shape {list(got)} in the weights, {list(shape)} in the plan"
        if dtype not in ("float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"):
            return f"{name}: dtype {dtype} in the weights; AttnRes parameters are floating point"
    if layout is not None:
        diff = layout_difference(layout, plan_layout(plan))
        if diff is not None:
            return f"the layout saved with the weights differs: {diff}"
    return None


# -- the schema, for docs/plan-format.md ---------------------------------------------------------------

def json_schema(cls) -> dict:
    """The JSON Schema of a saved plan of class `cls` (format, digest and the plan's fields)."""
    schema = _adapter(cls).json_schema(mode="serialization")
    schema["properties"] = {
        "format": {"const": FORMAT, "description": "the plan format's number"},
        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$",
                   "description": "SHA-256 of the canonical JSON of every other field"},
        **schema["properties"],
    }
    schema["required"] = ["format", "digest", *schema.get("required", [])]
    schema["title"] = f"attnres_compile conversion plan, format {FORMAT}"
    return schema


def markdown_fields(cls) -> str:
    """A table of every field of the format (plans of class `cls`): path, type and
    constraints, description."""
    schema = json_schema(cls)
    defs = schema.get("$defs", {})
    rows: list[tuple[str, str, str]] = []

    def resolve(node):
        while "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        return node

    def describe(node) -> str:
        node = resolve(node)
        if "anyOf" in node:
            parts = [describe(n) for n in node["anyOf"]]
            return " or ".join(dict.fromkeys(parts))
        if "oneOf" in node:
            return "one of " + ", ".join(describe(n) for n in node["oneOf"])
        if "const" in node:
            return json.dumps(node["const"])
        if "enum" in node:
            return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
        t = node.get("type", "any")
        bits = []
        for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
            if key in node:
                bits.append(f"{sym} {node[key]:g}" if isinstance(node[key], float) else f"{sym} {node[key]}")
        for key, label in (("minItems", "at least {} item(s)"), ("maxItems", "at most {} item(s)"),
                           ("minLength", "length >= {}"), ("maxLength", "length <= {}")):
            if key in node:
                bits.append(label.format(node[key]))
        if "pattern" in node:
            bits.append(f"matching `{node['pattern']}`")
        if t == "array":
            items = node.get("items") or node.get("prefixItems")
            inner = describe(items[0] if isinstance(items, list) else items) if items else "any"
            t = f"array of {inner}"
        if t == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            t = f"object of {describe(node['additionalProperties'])}"
        return t + (f" ({', '.join(bits)})" if bits else "")

    expanded: dict[str, str] = {}  # a definition's fields are listed once, at its first path

    def walk(node, path):
        ref = node.get("$ref", "").split("/")[-1]
        if ref and ref in expanded:
            rows.append((f"{path}.*", "", f"the fields of `{expanded[ref]}`"))
            return
        if ref:
            expanded[ref] = path
        node = resolve(node)
        for key, sub in node.get("properties", {}).items():
            full = f"{path}.{key}" if path else key
            target = resolve(sub)
            desc = sub.get("description") or target.get("description", "")
            required = key in node.get("required", [])
            if "oneOf" in target or "oneOf" in target.get("items", {}) or \
                    "oneOf" in (target.get("additionalProperties") or {}):
                kind = "array of" if target.get("type") == "array" else "object of"
                rows.append((full + ("" if required else " (optional)"), f"{kind} example inputs", desc))
                continue
            rows.append((full + ("" if required else " (optional)"), describe(sub), desc))
            if target.get("type") == "array" and isinstance(target.get("items"), dict):
                walk(target["items"], full + "[]")
            elif "anyOf" in target:
                for alt in target["anyOf"]:
                    if "properties" in resolve(alt):
                        walk(alt, full)
            elif "properties" in target:
                walk(sub, full)

    walk(schema, "")
    lines = ["| field | type and range | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{p}` | {t.replace('|', '&#124;')} | {d.replace('|', '&#124;')} |" for p, t, d in rows]
    return "\n".join(lines)
