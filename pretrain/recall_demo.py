"""A quick demo: train a tiny ReBased hybrid on a generated in-context recall task and print the loss.

Each sequence lists key-value pairs, then asks for some keys again; the model must recall the bound value
from context. Loss is measured only at those answers, so chance level is ln(num_values).

    python -m pretrain.recall_demo [--steps 300] [--model configs/models/tiny_rebased.yaml]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pretrain.models import build_model, load_model_config


def recall_batch(batch: int, pairs: int, queries: int, vocab: int, generator: torch.Generator):
    """input: k1 v1 k2 v2 ... kP vP q1 a1 q2 a2 ...; labels only at the answer positions (else -100)."""
    half = vocab // 2
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:pairs] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, pairs), generator=generator)
    pick = torch.randint(0, pairs, (batch, queries), generator=generator)
    q_keys, q_values = keys.gather(1, pick), values.gather(1, pick)
    context = torch.stack([keys, values], dim=2).flatten(1)
    asked = torch.stack([q_keys, q_values], dim=2).flatten(1)
    tokens = torch.cat([context, asked], dim=1)
    labels = torch.full_like(tokens, -100)
    labels[:, 2 * pairs::2] = q_values  # predict the value right after each queried key
    return tokens, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/models/tiny_rebased.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=48, help="tokens used by the task (keys + values)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = load_model_config(args.model)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    print(f"model {args.model}: layers {cfg.layers}, chance loss {math.log(args.vocab // 2):.3f}")
    start = time.time()
    for step in range(1, args.steps + 1):
        tokens, labels = recall_batch(args.batch, args.pairs, args.queries, args.vocab, gen)
        loss = model.loss(tokens[:, :-1], labels[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.1f}s)")
    tokens, labels = recall_batch(256, args.pairs, args.queries, args.vocab, gen)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    target = labels[:, 1:]
    mask = target != -100
    accuracy = (logits.argmax(-1)[mask] == target[mask]).float().mean().item()
    print(f"held-out recall accuracy {accuracy:.3f} (chance {2 / args.vocab:.3f})")
    return accuracy


if __name__ == "__main__":
    main()
