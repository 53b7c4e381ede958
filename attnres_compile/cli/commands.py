"""The commands: inspect, convert, export, check, plot-weights."""

from __future__ import annotations

from pathlib import Path

from .parser import EXIT_FAILED, EXIT_OK, BadInput, Failed, dim_bounds, suggested_fix
from .targets import Target, checks_module, convert_target, load_target
from .ui import UI, first_line, summary, write_json

def cmd_inspect(args, ui: UI) -> int:
    from ..errors import NoEligibleChainError

    target = load_target(args, ui)
    try:
        converted = convert_target(target, args, ui, args.preserve)
    except NoEligibleChainError as exc:
        if exc.report is not None:
            ui.print_report(exc.report)
        if args.json:
            data = {"status": "no_eligible_chain", "target": target.spec, "message": str(exc)}
            if exc.report is not None:
                data.update(exc.report.to_dict())
            write_json(args.json, data, ui)
        raise
    report = converted.attnres_report
    ui.print_report(report)
    if args.json:
        write_json(args.json, {"status": "ok", "target": target.spec, **report.to_dict()}, ui)
    return EXIT_OK


def _converted_for_export(target: Target, args, ui: UI):
    """(the converted model in eval mode, the output path with its folder made, the dynamic
    shapes of --dynamic / --dim or None): what `convert` and `export` share."""
    from .inputs import dynamic_shapes_for

    converted = convert_target(target, args, ui, args.preserve).eval()
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    bounds = dim_bounds(args)
    dynamic = dynamic_shapes_for(converted, target.args, target.kwargs, bounds) if args.dynamic else None
    return converted, out, dynamic


def cmd_convert(args, ui: UI) -> int:
    import torch

    from .. import load_attnres_state_dict, save_attnres
    from .inputs import resized_inputs

    target = load_target(args, ui)
    converted, out, dynamic = _converted_for_export(target, args, ui)
    weights = out.with_suffix(".attnres.safetensors")
    with ui.step("exporting the converted program (torch.export)"):
        try:
            program = torch.export.export(converted, target.args, kwargs=target.kwargs, strict=False,
                                          dynamic_shapes=dynamic)
        except Exception as exc:
            raise Failed(f"torch.export of the converted model failed: {type(exc).__name__}: "
                         f"{first_line(exc)}{suggested_fix(exc)}") from exc
        torch.export.save(program, out)
        save_attnres(converted, weights)
    with ui.step("verifying the saved files"):
        loaded = torch.export.load(out).module()
        runs = [("example inputs", target.args, target.kwargs)]
        if dynamic:
            r_args, r_kwargs = resized_inputs(target.args, target.kwargs, dynamic, converted)
            runs.append(("resized inputs " + _shapes_text(r_args, r_kwargs), r_args, r_kwargs))
        results = [(label, _program_err(loaded, converted, a, k)) for label, a, k in runs]
        load_attnres_state_dict(converted, weights)  # layout and names fit the converted model
    ui.print(f"converted {summary(converted.attnres_report)}")
    ui.print(f"program: {out}" + (f" (dynamic {_dyn_text(dynamic)})" if dynamic else ""))
    ui.print(f"attnres weights: {weights} ({len(converted.attnres_report.parameters)} tensors)")
    ok = _print_results(ui, [(f"torch.export.load(program) vs converted module on {label}", err)
                             for label, err in results], args.max_rel_err)
    return EXIT_OK if ok else EXIT_FAILED


def _print_results(ui: UI, results: list[tuple[str, float]], limit: float) -> bool:
    """One PASS/FAIL line per (label, max rel err) against `limit`; whether all passed."""
    ok = True
    for label, err in results:
        passed = err <= limit
        ok &= passed
        ui.print(f"{'PASS' if passed else 'FAIL'}  {label}: max rel err {checks_module().fmt(err)} (limit {limit:g})",
                 style=None if passed else "red")
    return ok


def _program_err(loaded, converted, args: tuple, kwargs: dict) -> float:
    import torch

    with torch.no_grad():
        ref = converted(*args, **kwargs)
        got = loaded(*args, **kwargs)
    ref_l, got_l = checks_module().tensor_leaves(ref), checks_module().tensor_leaves(got)
    if len(ref_l) == len(got_l):
        return max(checks_module().rel_err(g, r) for g, r in zip(got_l, ref_l))
    return checks_module().rel_err(checks_module().main_output(got), checks_module().main_output(ref))


def cmd_export(args, ui: UI) -> int:
    from ..onnx import count_depth_attention_nodes, export_onnx
    from .inputs import resized_inputs

    if args.fused and args.inline:
        raise BadInput("--fused needs DepthAttention nodes; it cannot be combined with --inline")
    if args.with_cache and args.dynamic:
        raise BadInput("--with-cache exports dynamic batch, sequence and past length already; drop --dynamic")
    target = load_target(args, ui)
    if args.with_cache:
        return _export_with_cache(target, args, ui)
    converted, out, dynamic = _converted_for_export(target, args, ui)
    with ui.step("exporting to ONNX"):
        try:
            proto = export_onnx(converted, target.args, out, kwargs=target.kwargs,
                                dynamic_shapes=dynamic, inline=args.inline)
        except Exception as exc:
            raise Failed(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}{suggested_fix(exc)}") from exc
    nodes = count_depth_attention_nodes(proto)
    ui.print(f"converted {summary(converted.attnres_report)}")
    ui.print(f"onnx: {out} ({'inlined, no DepthAttention nodes' if args.inline else f'{nodes} attnres::DepthAttention nodes'}"
             f"{', dynamic ' + _dyn_text(dynamic) if dynamic else ''})")
    with ui.step("running onnxruntime"):
        runs = [("example inputs", target.args, target.kwargs)]
        if dynamic:
            r_args, r_kwargs = resized_inputs(target.args, target.kwargs, dynamic, converted)
            runs.append(("resized inputs " + _shapes_text(r_args, r_kwargs), r_args, r_kwargs))
        sessions = [("onnxruntime", False)]
        if args.fused:
            try:
                from ..onnx import ort_kernel

                ort_kernel.library_path()
            except Exception as exc:
                raise Failed(f"the fused onnxruntime kernel is unavailable: {first_line(exc)}") from exc
            sessions.append(("onnxruntime + fused kernel", True))
        results = [(f"{who} vs PyTorch on {label}", checks_module().onnx_parity(proto, converted, a, k, fused=fused))
                   for who, fused in sessions for label, a, k in runs]
    return EXIT_OK if _print_results(ui, results, args.max_rel_err) else EXIT_FAILED


def _export_with_cache(target: Target, args, ui: UI) -> int:
    import torch

    from ..onnx.decoder import decoder_spec, export_decoder, ort_generate, write_genai_config

    converted = convert_target(target, args, ui, args.preserve).eval()
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    with ui.step("exporting the decoder with past to ONNX"):
        spec = decoder_spec(converted)  # a model without a cache argument: bad input, exit 2
        try:
            proto = export_decoder(converted, out, inline=args.inline)
        except Exception as exc:
            raise Failed(f"ONNX export with cache failed: {type(exc).__name__}: {first_line(exc)}") from exc
        config = None
        if getattr(converted, "config", None) is not None:
            config = write_genai_config(converted, out.parent, filename=out.name, spec=spec)
    ui.print(f"converted {summary(converted.attnres_report)}")
    ui.print(f"onnx: {out} (decoder with past: {spec.num_layers} layers of past_key_values.*.key/value in, "
             f"present.* out; dynamic batch, sequence and past length)")
    if config is not None:
        ui.print(f"onnxruntime-genai config: {config}")
    prompt = target.args[0]
    gen = getattr(converted, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    with torch.no_grad():
        want = converted.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=pad if pad is not None else eos)
    sessions = [("onnxruntime", False)] + ([("onnxruntime + fused kernel", True)] if args.fused else [])
    ok = True
    with ui.step("generating in onnxruntime"):
        results = [(who, ort_generate(proto, prompt, max_new_tokens=args.new_tokens, eos_token_id=eos,
                                      pad_token_id=pad, fused=fused)) for who, fused in sessions]
    for who, got in results:
        passed = got.shape == want.shape and bool(torch.equal(got, want))
        ok &= passed
        ui.print(f"{'PASS' if passed else 'FAIL'}  {who} generates PyTorch's {args.new_tokens} greedy tokens"
                 + ("" if passed else f": {got[0].tolist()} vs {want[0].tolist()}"), style=None if passed else "red")
    return EXIT_OK if ok else EXIT_FAILED


def _dyn_text(dynamic: dict) -> str:
    parts = []
    for name, spec in dynamic.items():
        if isinstance(spec, dict) and spec and all(isinstance(k, int) for k in spec):
            parts.append(f"{name}[" + ", ".join(f"{a}:{d.__name__}" for a, d in sorted(spec.items())) + "]")
    return " ".join(parts)


def _shapes_text(args: tuple, kwargs: dict) -> str:
    return ", ".join("x".join(str(s) for s in t.shape) for t in checks_module().tensor_leaves((args, kwargs)))


def cmd_check(args, ui: UI) -> int:
    from ..checks import verify

    target = load_target(args, ui)
    converted = convert_target(target, args, ui, args.preserve)
    report = converted.attnres_report
    ui.print(f"attnres check of {target.spec}: {summary(report)}")

    def show(c):
        ui.out.print(f"[{'green' if c.passed else 'red'}]{'PASS' if c.passed else 'FAIL'}[/]  "
                     f"{c.name:<20} ", end="", highlight=False)
        ui.out.print(c.detail, markup=False, highlight=False)

    what = ["step-0 equivalence", "gradient flow", *(["onnx parity"] if args.onnx else []),
            *(["generation"] if args.generate else [])]
    with ui.step(f"checking ({', '.join(what)})"):
        result = verify(converted, target.args, kwargs=target.kwargs, original=target.model,
                        expect_sites=args.expect_sites, max_rel_err=args.max_rel_err, onnx=args.onnx,
                        onnx_max_rel_err=args.onnx_max_rel_err, generate=args.generate,
                        on_check=show if ui.debug else None)
    if not ui.debug:
        for c in result.checks:
            show(c)
    for name, text in result.info():
        ui.out.print(f"[cyan]INFO[/]  {name:<20} ", end="", highlight=False)
        ui.out.print(text, markup=False, highlight=False)
    passed = sum(c.passed for c in result.checks)
    ok = result.passed
    ui.out.print(f"[{'green' if ok else 'red'}]{'check passed' if ok else 'check FAILED'}[/]: "
                 f"{passed}/{len(result.checks)} checks pass", highlight=False)
    if args.json:
        write_json(args.json, {
            "status": "pass" if ok else "fail",
            "target": args.model,
            "checks": [c.__dict__ for c in result.checks],
            "site_paths": result.site_paths,
            "kernel_selfcheck": result.kernel_selfcheck,
            "report": report.to_dict(),
        }, ui)
    return EXIT_OK if ok else EXIT_FAILED


def _load_program(path: Path):
    """torch.export.load, importing the transformers module of an output type the program's
    pytree names (a Hugging Face ModelOutput registers itself when its module is imported); a
    program naming any other module is refused, not imported."""
    import importlib
    import logging
    import re

    import torch

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__()
            self.text = []

        def emit(self, record):
            self.text.append(logging.Formatter().format(record))  # the message and its traceback

    tried: set[str] = set()
    while True:
        catch = Catch()
        logger = logging.getLogger("torch.export")
        level, propagate, handlers = logger.level, logger.propagate, logger.handlers[:]
        logger.handlers = [catch]  # the warning names the type; the user gets one line instead
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        try:
            return torch.export.load(path)
        except Exception as exc:
            found = re.search(r"Deserializing ([\w.]+) in pytree is not registered", " ".join(catch.text) + str(exc))
            module = found.group(1).rsplit(".", 1)[0] if found else None
            if module and module.split(".")[0] != "transformers":
                # a checkpoint never makes attnres import a module it names (docs/plan-format.md);
                # Hugging Face's output types are the one library whose modules register themselves
                raise BadInput(f"{path}: its outputs are {found.group(1)}, from module {module}, which attnres does "
                               "not import for a checkpoint (import it yourself, then load the program)") from exc
            if module and module not in tried:
                tried.add(module)
                try:
                    importlib.import_module(module)
                    continue
                except ImportError:
                    raise BadInput(f"{path}: its outputs are {found.group(1)}, whose module {module} cannot be "
                                   "imported here (install the library that defines it)") from exc
            if found:
                raise BadInput(f"{path}: its outputs are {found.group(1)}, which is not registered as a pytree "
                               "type in this process") from exc
            raise BadInput(f"{path} is not a program saved with torch.export.save: {first_line(exc)}") from exc
        finally:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def cmd_plot_weights(args, ui: UI) -> int:
    from ..analysis import plot_depth_weights, record_sites, schedules_from_layout

    path = Path(args.checkpoint)
    if not path.is_file():
        raise BadInput(f"CONVERTED_CHECKPOINT {path} does not exist (expected a .pt2 from torch.export.save)")
    with ui.step(f"loading {path}"):
        program = _load_program(path)
    example = program.example_inputs
    if example is None:
        raise BadInput(f"{path} holds no example inputs to run the program on; re-save it with torch 2.6 or later")
    ex_args, ex_kwargs = example
    schedules = None
    weights_file = path.with_suffix(".attnres.safetensors")
    if weights_file.is_file():
        from ..api import read_attnres_file

        _, layout = read_attnres_file(weights_file, tensors=False)
        if layout is not None:
            schedules = schedules_from_layout(layout)
    with ui.step("running the program and recording the depth weights"):
        try:
            records = record_sites(program.module(), ex_args, ex_kwargs, schedules=schedules)
        except ValueError as exc:
            raise BadInput(f"{path}: {exc}") from exc
    out = Path(args.output) if args.output else path.with_suffix(".weights.png")
    plot_depth_weights(records, out, title=f"{path.name}: mean depth-attention weights on its example inputs")
    if args.json:
        write_json(args.json, {"checkpoint": str(path), "sites": [
            {"chain": r.chain, "site": r.name, "sublayer": r.sublayer, "sources": r.sources,
             "weights": r.weights, "input_rms": r.input_rms} for r in records]}, ui)
    ui.print(f"{len(records)} sites, {sum(len(r.weights) for r in records)} weights -> {out}")
    for r in records:
        top = max(range(len(r.weights)), key=r.weights.__getitem__)
        ui.print(f"  chain{r.chain}.{r.name:<7} most weight on {r.sources[top]} ({r.weights[top]:.2f}) of "
                 f"{len(r.weights)} sources")
    return EXIT_OK
