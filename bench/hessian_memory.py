"""Peak memory of `hilal.hessian.layer_metrics` against the number of calibration samples.

Each configuration runs in its own subprocess: it builds the model and the calibration batches, notes its
peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, what the parent's RUSAGE_CHILDREN reports
for that child alone; `torch.cuda.max_memory_allocated` on CUDA) as the baseline, runs `layer_metrics` with
minimal probe and draw counts (memory, not accuracy, is measured) and reports its peak minus that baseline.

Cases: ResNet-20 at CIFAR shape (3x32x32, 10 classes, random weights, random images and labels) at
`--samples` calibration samples (default 256 and 2048), and full-size MobileBERT for question answering
(random weights, eager attention, `--bert-tokens` tokens) at `--bert-samples` (default 2 and 4) with the
budget forcing every graph to be rebuilt: a pass over the paper's 256 samples x 384 tokens is too slow for a
CPU benchmark, so there the check is that the peak does not grow from N to 2N samples. `--bert-layers block0`
(default) measures the embedding transformation, the first encoder block's layers and the QA head: the graphs
still run from the embeddings to the loss, but the power iteration does 16 block HVPs per sample instead of 340.

Usage: python bench/hessian_memory.py [--out bench/results/hessian_memory.json] [--samples 256,2048]
  [--batch-size 64] [--graph-bytes 536870912] [--bert-samples 2,4] [--bert-tokens 384] [--bert-layers block0|all]
  [--skip-bert] [--skip-resnet] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _peak_bytes(cuda: bool) -> int:
    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _resnet_case(case: dict[str, Any]) -> tuple[Any, list, list[str] | None]:
    import torch

    from hilal.models import build_model

    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    g = torch.Generator().manual_seed(0)
    n, bs = case["samples"], case["batch_size"]
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, [(x[a:a + bs], y[a:a + bs]) for a in range(0, n, bs)], None


def _bert_case(case: dict[str, Any]) -> tuple[Any, list, list[str] | None]:
    import torch
    from transformers import MobileBertConfig, MobileBertForQuestionAnswering

    from hilal.analog import mappable_layers

    torch.manual_seed(0)
    model = MobileBertForQuestionAnswering(MobileBertConfig(attn_implementation="eager"))
    g = torch.Generator().manual_seed(0)
    n, bs, t = case["samples"], case["batch_size"], case["tokens"]
    ids = torch.randint(0, model.config.vocab_size, (n, t), generator=g)
    start, end = torch.randint(0, t, (n,), generator=g), torch.randint(0, t, (n,), generator=g)
    batches = [{"input_ids": ids[a:a + bs], "attention_mask": torch.ones_like(ids[a:a + bs]),
                "token_type_ids": torch.zeros_like(ids[a:a + bs]), "start_positions": start[a:a + bs],
                "end_positions": end[a:a + bs]} for a in range(0, n, bs)]
    layers = None
    if case["layers"] == "block0":
        layers = [m for m in mappable_layers(model) if m.startswith(("mobilebert.embeddings.",
                                                                     "mobilebert.encoder.layer.0.", "qa_outputs"))]
    return model, batches, layers


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: baseline after model and data are built, then `layer_metrics`."""
    import gc
    import warnings

    import torch

    from hilal.hessian import HessianConfig, layer_metrics

    torch.set_num_threads(case["threads"])
    model, batches, layers = (_resnet_case if case["model"] == "resnet20" else _bert_case)(case)
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
        batches = [{k: v.cuda() for k, v in b.items()} if isinstance(b, dict) else tuple(t.cuda() for t in b)
                   for b in batches]
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    base = _peak_bytes(cuda)
    cfg = HessianConfig(probes=2, power_iters=1, eli_samples=1, first_order_samples=1, max_samples=case["samples"],
                        batch_size=case["batch_size"], graph_bytes=case["graph_bytes"])
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = layer_metrics(model, batches, "pcm", cfg, layers=layers, progress=False)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes(cuda)
    a = df.attrs
    return {**case, "device": "cuda" if cuda else "cpu", "layers_measured": len(df),
            "baseline_bytes": base, "peak_bytes": peak, "added_bytes": peak - base, "seconds": seconds,
            "curvature": a["curvature"], "curvature_reason": a["curvature_reason"],
            "graph_builds": a["graph_builds"], "graph_builds_weight": a["graph_builds_weight"],
            "graph_builds_output": a["graph_builds_output"], "graph_bytes_kept": a["graph_bytes_kept"],
            "warnings": [str(w.message) for w in caught if "Gauss-Newton" in str(w.message)]}


def _spawn(case: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "HILAL_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/hessian_memory.json")
    p.add_argument("--samples", default="256,2048", help="ResNet-20 calibration sizes")
    p.add_argument("--batch-size", type=int, default=64, help="ResNet-20 calibration batch size")
    p.add_argument("--graph-bytes", default=str(2**29),
                   help="HessianConfig.graph_bytes for ResNet-20 (several, comma-separated: each with each size)")
    p.add_argument("--bert-samples", default="2,4", help="MobileBERT calibration sizes")
    p.add_argument("--bert-batch-size", type=int, default=1)
    p.add_argument("--bert-graph-bytes", type=float, default=0.0, help="0: every graph rebuilt")
    p.add_argument("--bert-tokens", type=int, default=384)
    p.add_argument("--bert-layers", choices=["block0", "all"], default="block0")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    cases = [{"model": "resnet20", "samples": int(n), "batch_size": args.batch_size, "graph_bytes": float(b),
              "threads": args.threads} for b in args.graph_bytes.split(",") for n in args.samples.split(",")
             if not args.skip_resnet]
    if not args.skip_bert:
        cases += [{"model": "mobilebert", "samples": int(n), "batch_size": args.bert_batch_size,
                   "graph_bytes": args.bert_graph_bytes, "tokens": args.bert_tokens, "layers": args.bert_layers,
                   "threads": args.threads} for n in args.bert_samples.split(",")]
    results = []
    print(f"{'model':<11}{'samples':>8}{'batch':>6}{'budget GiB':>11}{'added GiB':>10}{'kept GiB':>9}"
          f"{'builds':>7}{'curvature':>14}{'s':>8}")
    for case in cases:
        r = _spawn(case)
        results.append(r)
        print(f"{r['model']:<11}{r['samples']:>8}{r['batch_size']:>6}{_gib(r['graph_bytes']):>11}"
              f"{_gib(r['added_bytes']):>10}{_gib(r['graph_bytes_kept']):>9}{r['graph_builds']:>7}"
              f"{r['curvature']:>14}{r['seconds']:>8.0f}", flush=True)
    summary: dict[str, Any] = {}
    for model in ("resnet20", "mobilebert"):
        rs = sorted((r for r in results if r["model"] == model), key=lambda r: r["samples"])
        if len(rs) >= 2 and rs[0]["samples"] != rs[-1]["samples"]:
            key = f"{model}_added_ratio_{rs[-1]['samples']}_over_{rs[0]['samples']}"
            summary[key] = rs[-1]["added_bytes"] / rs[0]["added_bytes"]
            print(f"{model}: peak added at {rs[-1]['samples']} / at {rs[0]['samples']} samples = {summary[key]:.3f}")
    big = max((r for r in results if r["model"] == "resnet20"), key=lambda r: r["samples"], default=None)
    if big is not None:
        summary["resnet20_gauss_newton_at_largest"] = big["curvature"] == "gauss-newton"
        print(f"resnet20 at {big['samples']} samples kept the Gauss-Newton path: "
              f"{summary['resnet20_gauss_newton_at_largest']} ({big['curvature_reason']})")
    import torch

    record = {"command": "python bench/hessian_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "summary": summary, "cases": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
