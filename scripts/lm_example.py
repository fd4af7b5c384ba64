"""A worked language-model example: train a small LLaMA, prune it to half its FLOPs, measure.

The corpus is the source text of Python's standard library (shipped with every Python), read
as bytes: tokens are byte values (vocabulary 256), so no tokenizer or download is needed. The
last 10% of the bytes are held out for perplexity.

1. ``transformers.LlamaForCausalLM`` (random init; RMS norms, rotary embeddings, grouped-query
   attention) is trained for ``--train-steps`` steps: the *baseline*.
2. It is converted with ``dagprune.build_from_unstructured_module(model, example_inputs=...)``
   and gated with ``ChannelPruning(dag, None, --target, --prune-steps, example_inputs=...)``.
   The gated model trains for ``--prune-steps`` steps on cross-entropy + the pruning losses +
   logit distillation from the frozen baseline (``--distill-weight``).
3. ``remove_channels()`` gives the slim model; its output is checked against the gated model's,
   its FLOPs counted, its perplexity measured.
4. The *control*: the baseline trained ``--prune-steps`` more steps without pruning, so that the
   extra training the pruned model got is visible on its own.

Writes ``resources/lm_example.md`` (figures, settings, the command) and prints the same.

Usage::

    nice -n 5 python scripts/lm_example.py                   # the committed figures
    python scripts/lm_example.py --train-steps 20 --prune-steps 20 --out /tmp/lm.md   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_PACKAGES = ("email", "json", "http", "logging", "asyncio", "unittest", "importlib", "xml")


def read_corpus(limit_bytes: int) -> torch.Tensor:
    """The standard library's source of :data:`CORPUS_PACKAGES`, as a tensor of byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for package in CORPUS_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            data = path.read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= limit_bytes:
                break
        if total >= limit_bytes:
            break
    data = b"".join(chunks)[:limit_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    """Endless random windows ``(inputs, next-byte targets)``."""
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def perplexity(model, data: torch.Tensor, length: int, windows: int) -> float:
    """exp(mean next-byte cross-entropy) over ``windows`` evenly spaced held-out windows."""
    starts = torch.linspace(0, len(data) - length - 2, windows).long().tolist()
    window = torch.stack([data[s:s + length + 1] for s in starts])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=window[:, :-1], use_cache=False)["logits"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    return math.exp(float(loss))


def build_model(args):
    import transformers
    transformers.utils.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=args.hidden * 11 // 4, max_position_embeddings=args.length,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config)


def train_plain(model, stream, steps: int, lr: float) -> float:
    """Trains ``model`` on next-byte cross-entropy; returns seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    start = time.time()
    for _ in range(steps):
        inputs, targets = next(stream)
        logits = model(input_ids=inputs, use_cache=False)["logits"]
        F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)).backward()
        optimizer.step(), optimizer.zero_grad(), schedule.step()
    return time.time() - start


def prune(teacher, stream, example: dict, args):
    """Gated training toward ``args.target`` of the FLOPs with logit distillation from
    ``teacher``; returns ``(pruning, gated, dag, seconds)``."""
    import dagprune
    from dagprune_algorithms.pruning import ChannelPruning, logit_distillation_loss
    teacher.eval()
    dag = dagprune.build_from_unstructured_module(teacher, example_inputs=example)
    pruning = ChannelPruning(dag, None, args.target, args.prune_steps, example_inputs=example)
    gated = pruning.prepare_for_pruning().train()
    optimizer = torch.optim.AdamW([{"params": pruning.weight_parameters(), "lr": args.lr / 3},
                                   {"params": pruning.gate_parameters(), "lr": 5e-2}], weight_decay=0.0)
    start = time.time()
    for step in range(args.prune_steps):
        inputs, targets = next(stream)
        logits = gated(input_ids=inputs)["logits"]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs, use_cache=False)["logits"]
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        loss = loss + args.distill_weight * logit_distillation_loss(logits, teacher_logits, args.temperature)
        _, flops_loss, entropy_loss, bkd_loss = pruning.compute_current_proportion_and_pruning_losses(step)
        (loss + flops_loss + entropy_loss + bkd_loss).backward()
        optimizer.step(), optimizer.zero_grad()
    return pruning, gated, dag, time.time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--prune-steps", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.5, help="share of the FLOPs to keep")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "resources" / "lm_example.md")
    args = parser.parse_args(argv)
    figures = run(args)
    text = report(args, figures)
    args.out.write_text(text)
    print(text)


def run(args) -> dict:
    import copy

    import dagprune
    from dagprune_algorithms.pruning import compute_flops
    corpus = read_corpus(args.corpus_bytes)
    split = int(len(corpus) * 0.9)
    train, held_out = corpus[:split], corpus[split:]
    stream = batches(train, args.batch, args.length, torch.Generator().manual_seed(args.seed))
    model = build_model(args)
    figures = {"corpus_bytes": len(corpus), "parameters": sum(p.numel() for p in model.parameters())}
    figures["baseline_seconds"] = train_plain(model, stream, args.train_steps, args.lr)
    figures["baseline_ppl"] = perplexity(model, held_out, args.length, 64)
    control = copy.deepcopy(model)
    example = {"input_ids": held_out[:2 * args.length].view(2, args.length), "use_cache": False}
    pruning, gated, dag, figures["prune_seconds"] = prune(model, stream, example, args)
    gated.eval()
    figures["gated_ppl"] = perplexity(gated, held_out, args.length, 64)
    slim = pruning.remove_channels().eval()
    check = {"input_ids": held_out[-3 * 50 - 3:-3].view(3, 50)}
    with torch.no_grad():
        figures["removal_difference"] = dagprune.max_relative_difference(gated(**check), slim(**check))
    figures["slim_ppl"] = perplexity(slim, held_out, args.length, 64)
    figures["flops_share"] = compute_flops(slim, example_inputs=example) / compute_flops(dag, example_inputs=example)
    figures["slim_parameters"] = sum(p.numel() for p in slim.parameters())
    figures["widths"] = {v.qualified_name: tuple(v.module.weight.shape) for v in slim.inner_vertices
                         if isinstance(v.module, torch.nn.Linear) and "layers.0." in (v.qualified_name or "")}
    figures["control_seconds"] = train_plain(control, stream, args.prune_steps, args.lr / 3)
    figures["control_ppl"] = perplexity(control, held_out, args.length, 64)
    return figures


def report(args, f: dict) -> str:
    command = "python scripts/lm_example.py " + " ".join(sys.argv[1:])
    widths = "\n".join(f"| `{name}` | {shape[1]} -> {shape[0]} |" for name, shape in f["widths"].items())
    return f"""# Worked example: a small LLaMA pruned to {args.target} of its FLOPs

Made by `{command.strip()}` (CPU, torch {torch.__version__}); every figure below is from that run.

* Corpus: {f['corpus_bytes']:,} bytes of Python's standard-library source ({', '.join(CORPUS_PACKAGES)}),
  byte tokens (vocabulary 256); the last 10% held out. Windows of {args.length} bytes, batch {args.batch}.
* Model: `transformers.LlamaForCausalLM`, hidden {args.hidden}, {args.layers} layers, 4 query heads
  sharing 2 key/value heads, MLP {args.hidden * 11 // 4}, {f['parameters']:,} parameters, random init.
* Baseline: {args.train_steps} AdamW steps (lr {args.lr}, cosine), {f['baseline_seconds']:.0f} s.
* Pruning: converted with `example_inputs`, `ChannelPruning(dag, None, {args.target}, {args.prune_steps},
  example_inputs=...)`, {args.prune_steps} steps of cross-entropy + FLOPs/entropy/bkd losses + logit
  distillation from the frozen baseline (weight {args.distill_weight}, temperature {args.temperature}),
  {f['prune_seconds']:.0f} s; then `remove_channels()`.
* Control: the baseline trained {args.prune_steps} more steps without pruning (lr {args.lr / 3}).

| model | FLOPs share | parameters | held-out perplexity (bytes) |
|---|---|---|---|
| baseline ({args.train_steps} steps) | 1.000 | {f['parameters']:,} | {f['baseline_ppl']:.3f} |
| gated, eval (hard masks) | - | - | {f['gated_ppl']:.3f} |
| slim, after `remove_channels()` | {f['flops_share']:.3f} | {f['slim_parameters']:,} | {f['slim_ppl']:.3f} |
| control: baseline + {args.prune_steps} steps, unpruned | 1.000 | {f['parameters']:,} | {f['control_ppl']:.3f} |

The slim model computes what the gated model computes: largest relative difference
{f['removal_difference']:.2e} on held-out text of another batch size and length.

Widths of the first layer's linear layers after removal (in -> out features):

| layer | features |
|---|---|
{widths}

Read the figures as one run at one seed: the pruned model had {args.prune_steps} training steps more than the
baseline, which is why the control is there; the gap between slim and control is the cost of halving
the FLOPs at this training budget.
"""


if __name__ == "__main__":
    main()
