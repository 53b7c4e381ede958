"""Verification as a library: `attnres_compile.verify` runs the checks `attnres check` prints
and returns a report object.

    report = attnres_compile.verify(converted, example_inputs, original=model, onnx=True)
    print(report); assert report.passed; report.to_dict()

Checks: the number of sites (when expected), step-0 equivalence with the original (eval mode),
gradient flow to every new parameter, and ONNX Runtime parity with random queries. Nothing
here changes the converted model: the ONNX check perturbs the queries of a copy.

The report also says which implementation each site's forward ran on the inputs
(`VerifyReport.site_paths`: "triton", "native CPU kernel", "PyTorch", "PyTorch (triton forward
disabled: ...)" when a generated kernel failed its first-use self-check, "two-phase: ...") and
the self-check status of every probed Triton kernel (`VerifyReport.kernel_selfcheck`).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from .errors import AttnResError
from .errors import first_line as _first_line


class VerificationError(AttnResError):
    """A check could not run on this model (e.g. its output holds no tensor)."""


# -- comparing outputs ---------------------------------------------------------------------------

def main_output(out):
    """The tensor to compare: the output itself, logits, last_hidden_state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise VerificationError(f"the model's output ({type(out).__name__}) holds no tensor to compare")


def tensor_leaves(out) -> list:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| in float64 (inf when shapes differ or anything is not finite)."""
    import numpy as np

    a = out.detach().double().cpu() if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out)).double()
    b = ref.detach().double().cpu() if isinstance(ref, torch.Tensor) else torch.from_numpy(np.asarray(ref)).double()
    if a.shape != b.shape or not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return math.inf
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else ("0" if x == 0 else f"{x:.2e}")


def _jsonable(x: float):
    return None if math.isnan(x) else ("inf" if math.isinf(x) else x)


def bound_arguments(module, args: tuple, kwargs: dict):
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise VerificationError(f"the example inputs do not fit {type(module).__name__}.forward: {exc}") from exc
    return sig, bound


def onnx_feed(session, module, args: tuple, kwargs: dict) -> dict:
    """Map the ONNX graph inputs to the tensors of (args, kwargs): by name, else by order."""
    _, bound = bound_arguments(module, args, kwargs)
    named, ordered = {}, []
    for name, value in bound.arguments.items():
        leaves = tensor_leaves(value)
        ordered.extend(leaves)
        if len(leaves) == 1:
            named[name] = leaves[0]
    inputs = session.get_inputs()
    if all(i.name in named for i in inputs):
        return {i.name: named[i.name].detach().cpu().numpy() for i in inputs}
    if len(inputs) == len(ordered):
        return {i.name: t.detach().cpu().numpy() for i, t in zip(inputs, ordered)}
    raise VerificationError(f"cannot match the ONNX inputs {[i.name for i in inputs]} to the model's tensor inputs")


def onnx_parity(proto, module, args: tuple, kwargs: dict, *, fused: bool = False) -> float:
    """Run onnxruntime and PyTorch (module in eval mode) on one set of inputs; the max relative error.

    fused: run the session with the fused DepthAttention kernel registered (`ort_session`)."""
    import onnxruntime as ort

    from .conversion.capture import without_cache

    kwargs = without_cache(module, kwargs)
    if fused:
        from .onnx import ort_session

        session = ort_session(proto, fused=True)
    else:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, onnx_feed(session, module, args, kwargs))
    with torch.no_grad():
        ref = module(*args, **kwargs)
    leaves = tensor_leaves(ref)
    if len(leaves) == len(got):
        return max(rel_err(torch.from_numpy(g), r) for g, r in zip(got, leaves))
    return rel_err(torch.from_numpy(got[0]), main_output(ref))


# -- the checks ----------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    passed: bool
    value: object
    limit: object
    detail: str


@dataclass
class VerifyReport:
    model: str
    checks: list[Check] = field(default_factory=list)
    #: site ("chain0.site3", "chain0.final") -> the implementation its forward ran (eval mode,
    #: no grad, on the verify inputs); see `site_paths`.
    site_paths: dict[str, str] = field(default_factory=dict)
    #: why `site_paths` is empty, when the forward that records them raised
    site_paths_error: str | None = None
    #: every Triton kernel variant probed in this process -> "ok" / "disabled: <reason>"
    kernel_selfcheck: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"model": self.model, "status": "pass" if self.passed else "fail",
                "checks": [asdict(c) for c in self.checks], "site_paths": dict(self.site_paths),
                "kernel_selfcheck": dict(self.kernel_selfcheck)}

    def info(self) -> list[tuple[str, str]]:
        """Informational lines (name, text) printed after the checks: the kernel path of the sites,
        and every Triton kernel the self-check disabled."""
        lines = [("kernel paths", self.site_paths_error or paths_summary(self.site_paths))]
        lines += [("kernel self-check", f"{k} {v}") for k, v in self.kernel_selfcheck.items() if v != "ok"]
        return lines

    def __rich_console__(self, console, options):
        from rich.text import Text

        for c in self.checks:
            yield Text.assemble(("PASS" if c.passed else "FAIL", "green" if c.passed else "red"),
                                f"  {c.name:<20} {c.detail}")
        for name, text in self.info():
            yield Text.assemble(("INFO", "cyan"), f"  {name:<20} {text}")
        n = sum(c.passed for c in self.checks)
        yield Text.assemble(("check passed" if self.passed else "check FAILED", "green" if self.passed else "red"),
                            f": {n}/{len(self.checks)} checks pass")

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, force_terminal=False, color_system=None).print(self)
        return buf.getvalue()


def _site_name(param_name: str) -> str:
    """"attnres.chain0.site3.query" (maybe under a wrapper's prefix) -> "chain0.site3"."""
    parts = param_name.split(".")
    start = len(parts) - 1 - parts[::-1].index("attnres") if "attnres" in parts else 0
    return ".".join(parts[start + 1:-1])


def site_paths(converted, args: tuple, kwargs: dict) -> dict[str, str]:
    """One eval-mode, no-grad forward on the inputs, recording which implementation each site ran
    (``ops.paths.record_site_paths``): site name -> path, "not run" for a site the
    inputs did not reach. Sites with one source (the identity) have no parameters and no entry."""
    from .api import attnres_parameters
    from .ops.paths import record_site_paths

    queries: dict[int, tuple] = {}
    for name, p in attnres_parameters(converted).items():
        if name.endswith(".query"):
            queries.setdefault(id(p), (p, _site_name(name)))
    was = converted.training
    converted.eval()
    try:
        with torch.no_grad(), record_site_paths() as rec:
            converted(*args, **kwargs)
    finally:
        converted.train(was)
    return {name: rec.of(p) or "not run" for p, name in queries.values()}


def paths_summary(paths: dict[str, str], limit: int = 6) -> str:
    """"native CPU kernel: chain0.site1, chain0.site2 (2 sites); PyTorch: chain0.final" style."""
    if not paths:
        return "no depth-attention site with parameters"
    groups: dict[str, list[str]] = {}
    for site, path in paths.items():
        groups.setdefault(path, []).append(site)
    parts = []
    for path, sites in groups.items():
        shown = sites if len(sites) <= limit else [*sites[:limit - 1], "...", sites[-1]]
        parts.append(f"{path}: {', '.join(shown)}" + (f" ({len(sites)} sites)" if len(sites) > 1 else ""))
    return "; ".join(parts)


def check_sites(converted, expect: int) -> Check:
    n = converted.attnres_report.num_sites
    return Check("sites", n == expect, n, expect, f"{n} (expected {expect})")


def check_equivalence(original, converted, args: tuple, kwargs: dict, limit: float) -> Check:
    """Step-0 outputs of the converted model against the original's, both in eval mode."""
    preserve = converted.attnres.plan.preserve
    was_o, was_c = original.training, converted.training
    original.eval()
    converted.eval()
    try:
        with torch.no_grad():
            ref = main_output(original(*args, **kwargs))
            out = main_output(converted(*args, **kwargs))
    finally:
        original.train(was_o)
        converted.train(was_c)
    err = rel_err(out, ref)
    return Check("step-0 equivalence", err <= limit, _jsonable(err), limit,
                 f"max rel err {fmt(err)} (limit {limit:g}), eval mode, preserve={preserve!r}")


def check_gradients(converted, args: tuple, kwargs: dict) -> Check:
    """One backward in train mode: every query gets a finite non-zero gradient, every gain one."""
    from .api import attnres_parameters

    params = attnres_parameters(converted)
    if not params:
        return Check("gradient flow", True, 0, None, "no new parameters (every site is the identity)")
    was = converted.training
    saved = {n: p.grad for n, p in converted.named_parameters()}
    converted.train()
    converted.zero_grad(set_to_none=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = main_output(converted(*args, **kwargs))
            # A fixed random projection of the output: a plain sum can have an identically zero
            # gradient (e.g. outputs that are softmax probabilities), a random one does not.
            weight = torch.randn(out.shape, dtype=torch.float32).to(out.device)
        (out.float() * weight).sum().backward()
        queries = {n: p for n, p in params.items() if n.endswith(".query")}
        gains = {n: p for n, p in params.items() if not n.endswith(".query")}
        bad_q, sizes = [], []
        for n, p in queries.items():
            g = p.grad
            if g is None or not torch.isfinite(g).all() or g.abs().max().item() == 0:
                bad_q.append(f"{n} ({'no grad' if g is None else 'not finite' if not torch.isfinite(g).all() else 'zero'})")
            else:
                sizes.append(g.abs().max().item())
        bad_g = [f"{n} ({'no grad' if p.grad is None else 'not finite'})" for n, p in gains.items()
                 if p.grad is None or not torch.isfinite(p.grad).all()]
    finally:
        for n, p in converted.named_parameters():
            p.grad = saved.get(n)
        converted.train(was)
    ok = not bad_q and not bad_g
    detail = (f"{len(queries) - len(bad_q)}/{len(queries)} queries finite and non-zero"
              + (f" (smallest max|grad| {fmt(min(sizes))})" if sizes else "")
              + f"; {len(gains) - len(bad_g)}/{len(gains)} norm_weight grads present")
    if not ok:
        bad = bad_q + bad_g
        detail += "; failing: " + ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return Check("gradient flow", ok, len(queries) - len(bad_q), len(queries), detail)


def check_onnx(converted, args: tuple, kwargs: dict, limit: float) -> Check:
    """Export a copy with random queries to ONNX; onnxruntime against PyTorch."""
    from .api import attnres_parameters
    from .onnx import count_depth_attention_nodes, export_onnx

    model = copy.deepcopy(converted).eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # non-zero queries, so the parity covers the depth softmax
        for p in attnres_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, dtype=torch.float32).to(p.dtype))
    expected = sum(1 for c in model.attnres.plan.chains for s in c.sites if s.param_prefix)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proto = export_onnx(model, args, Path(tmp) / "model.onnx", kwargs=kwargs)
    except Exception as exc:
        return Check("onnx parity", False, None, limit, f"export failed: {type(exc).__name__}: {_first_line(exc)}")
    nodes = count_depth_attention_nodes(proto)
    try:
        err = onnx_parity(proto, model, args, kwargs)
    except Exception as exc:
        return Check("onnx parity", False, None, limit,
                     f"onnxruntime failed: {type(exc).__name__}: {_first_line(exc)}")
    ok = err <= limit and nodes == expected
    detail = (f"max rel err {fmt(err)} (limit {limit:g}), {nodes} DepthAttention nodes"
              + (f" (expected {expected})" if nodes != expected else "") + ", random queries")
    return Check("onnx parity", ok, _jsonable(err), limit, detail)


def check_generation(original, converted, args: tuple, new_tokens: int) -> Check:
    """Greedy tokens from the example prompt: the original, the converted model (generate()) and
    its decoder with past in onnxruntime must agree (exact mode at step 0)."""
    from .onnx.decoder import export_decoder, ort_generate

    if not callable(getattr(converted, "generate", None)):
        return Check("generation", False, None, None, f"{type(converted).__name__} has no generate(): not a "
                                                      "generative model")
    prompt = args[0]
    gen = getattr(converted, "generation_config", None)
    eos, pad = getattr(gen, "eos_token_id", None), getattr(gen, "pad_token_id", None)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad if pad is not None else eos)
    with torch.no_grad():
        want = original.eval().generate(prompt, **kw)
        got = converted.eval().generate(prompt, **kw)
        ort = ort_generate(export_decoder(converted), prompt, max_new_tokens=new_tokens, eos_token_id=eos,
                           pad_token_id=pad)
    same_pt, same_ort = bool(torch.equal(got, want)), ort.shape == want.shape and bool(torch.equal(ort, want))
    detail = (f"{new_tokens} greedy tokens: PyTorch {'equal to' if same_pt else 'DIFFERENT from'} the original, "
              f"onnxruntime (decoder with past) {'equal' if same_ort else 'DIFFERENT'}")
    return Check("generation", same_pt and same_ort, int(same_pt) + int(same_ort), 2, detail)


def verify(converted, example_inputs, *, kwargs: dict | None = None, original=None,
           expect_sites: int | None = None, max_rel_err: float = 1e-5, onnx: bool = False,
           onnx_max_rel_err: float = 1e-4, generate: int | None = None, on_check=None) -> VerifyReport:
    """Run the conversion checks on `converted` with `example_inputs` (and `kwargs`).

    Args:
        original: the model before conversion; gives the step-0 equivalence check (meaningful in
            preserve="exact", or in "scale" when the consumers' norm eps is negligible).
        expect_sites: the number of depth-attention sites expected.
        max_rel_err / onnx_max_rel_err: the limits of the equivalence and ONNX checks.
        generate: N greedy tokens from the prompt (`example_inputs[0]`) with `original`, the
            converted model and its ONNX decoder with past; all three must agree.
        on_check: called with each Check as it completes (the CLI prints them as they come).

    A check that raises is a failed check whose detail names the exception. After the gradient
    check one more eval-mode forward records which implementation each site ran
    (`VerifyReport.site_paths`, `VerifyReport.info()`; information, not a check).
    """
    from .api import is_converted
    from .conversion.capture import normalize_inputs

    if not is_converted(converted):
        raise TypeError(f"verify expects a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    args, kwargs = normalize_inputs(example_inputs, kwargs)
    report = VerifyReport(model=type(converted).__name__)
    steps = []
    if expect_sites is not None:
        steps.append(("sites", lambda: check_sites(converted, expect_sites)))
    if original is not None:
        steps.append(("step-0 equivalence", lambda: check_equivalence(original, converted, args, kwargs, max_rel_err)))
    steps.append(("gradient flow", lambda: check_gradients(converted, args, kwargs)))
    if onnx:
        steps.append(("onnx parity", lambda: check_onnx(converted, args, kwargs, onnx_max_rel_err)))
    if generate:
        if original is None:
            raise ValueError("verify(generate=N) compares with the original model: pass original=")
        steps.append(("generation", lambda: check_generation(original, converted, args, generate)))
    for name, run in steps:
        try:
            result = run()
        except Exception as exc:  # a model that fails to run is a failed check, not a crash
            result = Check(name, False, None, None, f"raised {type(exc).__name__}: {_first_line(exc)}")
        report.checks.append(result)
        if on_check is not None:
            on_check(result)
        if name == "gradient flow":  # the kernel paths (info, not a check) come next
            try:
                report.site_paths = site_paths(converted, args, kwargs)
            except Exception as exc:
                report.site_paths_error = f"not recorded: the forward raised {type(exc).__name__}: {_first_line(exc)}"
    from .ops.kernels import selfcheck

    report.kernel_selfcheck = selfcheck.status()
    return report
