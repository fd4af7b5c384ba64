"""Measures the tracing mechanisms dagprune could convert Hugging Face models with.

For every model of ``scripts/coverage_transformers.py`` (tiny configs, random init), in one
process per model:

* ``fx``: ``torch.fx.symbolic_trace`` with the example's non-tensor arguments as
  ``concrete_args`` (dagprune's tracer before example values: symbolic proxies only);
* ``dagprune``: ``build_from_unstructured_module(model, example_inputs=...)`` (torch.fx with
  example values, see ``dagprune/value_tracing.py``), exact on the example and on a second input
  of another batch size and length;
* ``export``: ``torch.export.export(model, (), kwargs, strict=False)``, exact on the example and
  on the second input (exported with dynamic batch and length where torch accepts them, else
  static), with its graph's node count and distinct ATen ops, and whether its weights are
  still attached to the layers that own them (they are lifted into graph inputs).

Writes ``build/tracing_mechanisms.jsonl`` and prints a summary table (quoted in
``resources/tracing_decision.md``).

Usage::

    nice -n 10 python scripts/tracing_mechanisms.py [--models 'Llama*' ...]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_transformers import MODELS, build_model, example_inputs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "build" / "tracing_mechanisms.jsonl"


def _tensors(inputs: dict) -> dict:
    import torch
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _fixed(inputs: dict) -> dict:
    import torch
    return {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}


def _exact(model, converted, inputs: dict) -> float:
    import torch

    import dagprune
    with torch.no_grad():
        return float(dagprune.max_relative_difference(model(**inputs), converted(**inputs)))


def try_fx(model, inputs: dict) -> dict:
    import torch.fx as fx
    start = time.time()
    try:
        fx.symbolic_trace(model, concrete_args=_fixed(inputs) or None)
    except Exception as error:  # noqa: BLE001 - recorded
        return {"fx": False, "fx_error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return {"fx": True, "fx_seconds": round(time.time() - start, 2)}


def try_dagprune(model, inputs: dict, second: dict) -> dict:
    import dagprune
    start = time.time()
    try:
        dag = dagprune.build_from_unstructured_module(model, example_inputs=inputs)
    except Exception as error:  # noqa: BLE001 - recorded
        return {"dagprune": False, "dagprune_error": f"{type(error).__name__}: {str(error)[:160]}"}
    seconds = round(time.time() - start, 2)
    worst = max(_exact(model, dag, inputs), _exact(model, dag, {**second, **_fixed(inputs)}))
    return {"dagprune": worst <= 1e-5, "dagprune_seconds": seconds, "dagprune_difference": worst,
            "dagprune_vertices": len(dag.inner_vertices)}


def try_export(model, inputs: dict, second: dict) -> dict:
    import torch
    start = time.time()
    auto = torch.export.Dim.AUTO
    dynamic = {key: ({0: auto, 1: auto} if value.ndim == 2 else {0: auto}) if isinstance(value, torch.Tensor) else None
               for key, value in inputs.items()}
    try:
        program = torch.export.export(model, (), dict(inputs), dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # noqa: BLE001 - recorded
        return {"export": False, "export_error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    seconds = round(time.time() - start, 2)
    module = program.module()
    fixed = _fixed(inputs)
    same = _exact(model, module, inputs)
    try:
        other = _exact(model, module, {**second, **fixed})
    except Exception:  # noqa: BLE001 - shapes specialised on the example
        other = float("inf")
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    lifted = sum(1 for spec in program.graph_signature.input_specs if spec.kind.name in ("PARAMETER", "BUFFER"))
    return {"export": same <= 1e-5, "export_seconds": seconds, "export_other_shapes": other <= 1e-5,
            "export_nodes": len(nodes), "export_ops": len({str(n.target) for n in nodes}),
            "export_lifted_weights": lifted}


def measure(name: str) -> dict:
    warnings.simplefilter("ignore")
    record = {"name": name, "kind": MODELS[name][0]}
    model = build_model(name)
    inputs = example_inputs(name, model.config)
    second = _tensors(example_inputs(name, model.config, second=True))
    record.update(try_fx(build_model(name), inputs))
    record.update(try_dagprune(model, inputs, second))
    record.update(try_export(build_model(name), inputs, second))
    return record


def summary(records: list[dict]) -> str:
    count = len(records)
    share = lambda key: sum(1 for r in records if r.get(key)) # noqa: E731
    lines = [f"models: {count}",
             f"torch.fx symbolic, concrete non-tensor args: {share('fx')} of {count} trace",
             f"dagprune (fx + example values): {share('dagprune')} of {count} exact on both inputs",
             f"torch.export (strict=False): {share('export')} of {count} exact on the example, "
             f"{share('export_other_shapes')} of {count} also on another batch size / length"]
    exported = [r for r in records if r.get("export")]
    if exported:
        lines.append("export graph: median %d ATen nodes, %d distinct ops, %d lifted weights per model" % tuple(
            sorted(r[k] for r in exported)[len(exported) // 2]
            for k in ("export_nodes", "export_ops", "export_lifted_weights")))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["*"])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RECORD " + json.dumps(measure(args.child)))
        return
    names = [n for n in MODELS if any(fnmatch.fnmatch(n, p) for p in args.models)]
    records = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            done = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RECORD ")]
            record = json.loads(lines[-1][7:]) if lines else {"name": name, "error": done.stderr[-300:]}
        except subprocess.TimeoutExpired:
            record = {"name": name, "error": "timeout"}
        records.append(record)
        print(json.dumps(record), flush=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(summary(records))


if __name__ == "__main__":
    main()
