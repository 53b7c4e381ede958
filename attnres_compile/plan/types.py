"""The conversion plan: what `convert()` decided, fixed once and served at every call.

The plan names everything by things that outlive the captured graph it was found on:

* each residual add by where it runs: the module whose forward runs it (its path in the
  model), the code location (file, line, and the line's text, checked when a plan is installed
  again), and which operand carries the stream;
* each chain by the module that owns it (the innermost module on the call stack of every
  link), its block size, feature axis and width;
* each site by its sources, eps, scale and parameter name.

So one plan serves every call structure of the model (other keywords, shapes, modes, dtypes,
caches), every later capture of it (torch.export, torch.compile, ONNX) and a saved model
loaded in another process.

These data classes are also the saved format's schema: each field's annotation gives its type,
range or allowed values and a description, which plan/format.py validates a saved document
against (with pydantic) and docs/plan-format.md is generated from. Relations between fields
(a site's sources follow from its chain's block size, its scale from `preserve`, ...) are
checked there too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, WithJsonSchema
from typing_extensions import TypedDict

from . import format as _format
from .fields import (_INPUT_DTYPES, STRICT, Device, FloatDType, Identifier, ModulePath, PythonModule, SiteName,
                     SourceFile, VersionText)

from .limits import (MAX_BRANCHES, MAX_CHAINS, MAX_DIM, MAX_EPS, MAX_INPUT_DEPTH, MAX_INPUTS, MAX_INT, MAX_LINE,
                     MAX_NAME, MAX_OFFSET, MAX_SUBLAYERS, MAX_TENSOR_DIMS, MAX_TENSOR_NUMEL, MAX_TEXT, MIN_EPS)
from .schedule import SiteSchedule

# -- example inputs (what a re-derivation captures the model with) --------------------------------

class TensorSpec(TypedDict):
    __pydantic_config__ = STRICT
    tensor: Annotated[list[Annotated[int, Field(ge=0, le=1 << 31)]], Field(max_length=MAX_TENSOR_DIMS)]
    dtype: Literal[_INPUT_DTYPES]


class ValueSpec(TypedDict):
    __pydantic_config__ = STRICT
    value: Union[None, bool, Annotated[int, Field(gt=-MAX_INT, lt=MAX_INT)],
                 Annotated[float, Field(allow_inf_nan=False)], Annotated[str, Field(max_length=MAX_TEXT)]]


class ListSpec(TypedDict):
    __pydantic_config__ = STRICT
    list: Annotated[list[InputSpec], Field(max_length=MAX_INPUTS)]


class TupleSpec(TypedDict):
    __pydantic_config__ = STRICT
    tuple: Annotated[list[InputSpec], Field(max_length=MAX_INPUTS)]


class DictSpec(TypedDict):
    __pydantic_config__ = STRICT
    dict: Annotated[dict[Annotated[str, Field(max_length=MAX_NAME)], InputSpec], Field(max_length=MAX_INPUTS)]


class UnsupportedSpec(TypedDict):
    __pydantic_config__ = STRICT
    unsupported: Annotated[str, Field(max_length=MAX_NAME)]


_SPEC_KINDS = ("tensor", "value", "list", "tuple", "dict", "unsupported")


def _spec_kind(v) -> str | None:
    if isinstance(v, dict):
        return next((k for k in _SPEC_KINDS if k in v), None)
    return None


InputSpec = Annotated[Union[Annotated[TensorSpec, Tag("tensor")], Annotated[ValueSpec, Tag("value")],
                            Annotated[ListSpec, Tag("list")], Annotated[TupleSpec, Tag("tuple")],
                            Annotated[DictSpec, Tag("dict")], Annotated[UnsupportedSpec, Tag("unsupported")]],
                      Discriminator(_spec_kind, custom_error_type="input_spec",
                                    custom_error_message="an example input is one of {tensor, dtype}, {value}, "
                                                         "{list}, {tuple}, {dict} or {unsupported}")]


class InputsSpec(TypedDict):
    """The example inputs a plan was captured on: tensors by shape and dtype, plain values as they were."""
    __pydantic_config__ = STRICT
    args: Annotated[list[InputSpec], Field(max_length=MAX_INPUTS, description="positional inputs, each an example input")]
    kwargs: Annotated[dict[Identifier, InputSpec], Field(max_length=MAX_INPUTS, description=(
        "keyword inputs by name, each an example input"))]


def _bounded_inputs(inputs: InputsSpec) -> InputsSpec:
    """Nesting and tensor sizes a re-derivation can rebuild (it allocates every example tensor)."""
    def walk(spec, depth):
        if depth > MAX_INPUT_DEPTH:
            raise ValueError(f"example inputs nest deeper than {MAX_INPUT_DEPTH} levels")
        if "tensor" in spec:
            numel = 1
            for n in spec["tensor"]:
                numel *= n
            if numel > MAX_TENSOR_NUMEL:
                raise ValueError(f"an example tensor of shape {spec['tensor']} has more than {MAX_TENSOR_NUMEL} elements")
        for child in spec.get("list", spec.get("tuple", ())):
            walk(child, depth + 1)
        for child in spec.get("dict", {}).values():
            walk(child, depth + 1)

    for spec in [*inputs["args"], *inputs["kwargs"].values()]:
        walk(spec, 1)
    return inputs


class PlanOptions(TypedDict, total=False):
    """convert()'s options, for a re-derivation to use again."""
    __pydantic_config__ = STRICT
    num_blocks: Annotated[int | None, Field(ge=1, le=MAX_SUBLAYERS, description="blocks per stream, counted in layers")]
    block_size: Annotated[int | None, Field(ge=1, le=MAX_SUBLAYERS, description="sublayers per block, as given")]
    eps: Annotated[float | None, Field(ge=MIN_EPS, le=MAX_EPS, description="one eps for every site; null: each "
                                                                          "norm's own")]
    dynamic: Annotated[bool, Field(description="whether input dimensions were captured as dynamic")]


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class SitePlan:
    """One depth-attention site of a chain (reported, and used to build its parameters)."""

    __pydantic_config__ = STRICT

    chain: Annotated[int, Field(ge=0, lt=MAX_CHAINS, description="index of its chain")]
    name: Annotated[SiteName, Field(description='"site<l>" feeds sublayer l; "final" replaces the stream\'s end')]
    schedule: SiteSchedule
    eps: Annotated[float, Field(ge=MIN_EPS, le=MAX_EPS, description="RMS eps of the key norm")]
    scale: Annotated[float, Field(gt=0, le=MAX_SUBLAYERS + 1, description=(
        "output multiplier: 1 (preserve='scale') or the number of sources (preserve='exact')"))]
    module: Annotated[ModulePath, Field(description="the sublayer it feeds (empty for the final site)")]
    dim: Annotated[int, Field(ge=1, le=MAX_DIM, description="width D of the stream")]
    dtype: Annotated[FloatDType, Field(description="dtype of its parameters when made")]
    device: Annotated[Device, Field(description="device of its parameters when made (loading follows the model's)")]
    param_prefix: Annotated[str | None, Field(pattern=r"^attnres\.chain[0-9]{1,3}\.(site[0-9]{1,5}|final)$",
                                              description="`attnres.chain<c>.<name>`; null for a one-source site "
                                                          "(the identity, no parameters)")]
    # captured nodes that read the site's output (graph rewrites only; not saved)
    reads: Annotated[list[str], Field(exclude=True)] = field(default_factory=list)


@dataclass(frozen=True)
class AddSite:
    """Where one add of a residual link runs, as the converted model meets it at call time."""

    __pydantic_config__ = STRICT

    container: Annotated[ModulePath, Field(description="the module whose forward (or a helper it calls) runs it")]
    file: Annotated[SourceFile, Field(description=(
        "its code file relative to its module's folder (`modeling_llama.py`), never an absolute path; "
        "found again only among the source files of the model's own classes"))]
    module_name: Annotated[PythonModule | None, Field(description=(
        "the Python module of that file; must be the module of one of the model's classes (never imported)"))]
    line: Annotated[int, Field(ge=1, le=MAX_LINE, description="the add's line in `file`")]
    func: Annotated[str, Field(max_length=MAX_NAME, pattern=r"^([A-Za-z_][A-Za-z0-9_]*|<[a-z_]+>)?$",
                               description="the function that runs it (for messages)")]
    code: Annotated[str, Field(max_length=MAX_TEXT, pattern=r"^[^\n\r]*$", description=(
        "the line's text: a plan whose line now holds other text is re-derived from the model's code"))]
    stream_arg: Annotated[int, Field(ge=0, le=1, description="the operand that carries the stream: 0 or 1")]
    inplace: Annotated[bool, Field(description="whether the add writes its left operand (`+=`, `.add_`)")]
    lasti: Annotated[int | None, Field(ge=0, le=MAX_OFFSET, description=(
        "bytecode offset of the add (a line may hold several); null: any"))] = None
    cols: Annotated[tuple[Annotated[int, Field(ge=0, le=MAX_OFFSET)], Annotated[int, Field(ge=0, le=MAX_OFFSET)]] | None,
                    Field(description="its column span [start, end), for Dynamo (whose offsets differ)")] = None

    def where(self) -> str:
        short = "/".join(self.file.split("/")[-2:])
        return f"{short}:{self.line} in {self.func}: {self.code}"


@dataclass(frozen=True)
class LinkPlan:
    __pydantic_config__ = STRICT

    add: Annotated[AddSite, Field(description="the add that produces the next stream value")]
    absorbed: Annotated[tuple[AddSite, ...], Field(max_length=MAX_BRANCHES - 1, description=(
        "inner adds of a parallel residual, in run order"))] = ()
    sublayer: Annotated[ModulePath, Field(description="the sublayer's module path")] = ""


def _feature_axis(axis: int) -> int:
    if axis not in (-1, 1):  # a strict int (not a Literal, which would take True for 1)
        raise ValueError("must be -1 or 1")
    return axis


@dataclass
class ChainPlan:
    __pydantic_config__ = STRICT

    index: Annotated[int, Field(ge=0, lt=MAX_CHAINS, description="its position in `chains`")]
    owner: Annotated[ModulePath, Field(description="the module whose forward runs the whole chain")]
    block_size: Annotated[int, Field(ge=1, le=MAX_SUBLAYERS, description="S, sublayers per block")]
    feature_axis: Annotated[int, AfterValidator(_feature_axis), WithJsonSchema({"enum": [-1, 1]}),
                            Field(description="-1, or 1 for a channels-first (NCHW) stream")]
    dim: Annotated[int, Field(ge=1, le=MAX_DIM, description="width D of the stream")]
    links: Annotated[list[LinkPlan], Field(min_length=1, max_length=MAX_SUBLAYERS, description="one per sublayer")]
    sites: Annotated[list[SitePlan], Field(min_length=2, max_length=MAX_SUBLAYERS + 1, description=(
        "one per sublayer, then the final site"))]

    def site_for(self, sublayer: int | None) -> SitePlan:
        """The site that feeds sublayer `sublayer` (None: the final consumer)."""
        return self.sites[-1] if sublayer is None else self.sites[sublayer]


def _python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


@dataclass
class ConversionPlan:
    __pydantic_config__ = STRICT

    model: Annotated[Identifier, Field(description="class name of the converted model")]
    preserve: Annotated[Literal["scale", "exact"], Field(description=(
        "'scale' (the paper's: zero queries give each sublayer the stream / M) or 'exact' (each site's output "
        "times M: the original's outputs at step 0)"))]
    chains: Annotated[list[ChainPlan], Field(min_length=1, max_length=MAX_CHAINS, description=(
        "the converted residual streams"))]
    python: Annotated[str, Field(pattern=r"^([0-9]{1,2}\.[0-9]{1,3})?$", description=(
        "Python version the plan was made under (bytecode offsets are per version)"))] = field(default_factory=_python)
    # What a re-derivation needs when the model's code moved (runtime/replay.py): convert()'s
    # options, the example inputs' structure, and the versions the plan was made under (messages).
    options: Annotated[PlanOptions, Field(description="convert()'s options")] = field(default_factory=dict)
    inputs: Annotated[Annotated[InputsSpec, AfterValidator(_bounded_inputs)] | None, Field(description=(
        "the example inputs' structure, rebuilt to capture the model again; null: `input_ids` made from a "
        "Hugging Face model's config"))] = None
    versions: Annotated[dict[Literal["python", "torch", "transformers"], VersionText], Field(description=(
        "versions the plan was made under (for messages)"))] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The saved form (plan/format.py): JSON-ready, with its format number and digest."""
        return _format.to_document(self)

    @classmethod
    def from_dict(cls, d) -> ConversionPlan:
        """A saved plan, validated in full (plan/format.py); PlanFormatError names the field at fault."""
        return _format.read_document(d, cls)


def read_plan(doc) -> ConversionPlan:
    """The plan a saved document holds, validated in full (plan/format.py: format, schema,
    relations, digest). Raises PlanFormatError naming the field at fault."""
    return _format.read_document(doc, ConversionPlan)
