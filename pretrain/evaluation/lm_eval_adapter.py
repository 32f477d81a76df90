"""Adapter for lm-evaluation-harness (``lm_eval``): our models behind its ``LM`` interface.

    from pretrain.evaluation.lm_eval_adapter import make_lm_eval_model
    lm = make_lm_eval_model("runs/x/export", "tok.model")
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

``lm_eval`` stays optional: it is imported only by ``make_lm_eval_model``. The scoring logic lives in
``LMEvalMethods`` so it can be used (and tested) without the harness. Generation runs through the batched decoder
(``pretrain.generation``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.data.tokenizer import Tokenizer
from pretrain.evaluation.loading import load_model
from pretrain.evaluation.scoring import Document, score_documents
from pretrain.generation.decoder import generate


class LMEvalMethods:
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` over a model and a tokenizer.

    Requests are anything with an ``args`` tuple, as lm_eval's ``Instance``. Every text is preceded by EOD, the
    token the model saw before each document in training.
    """

    def __init__(self, model, tokenizer, *, max_length: int | None = None, device="cpu", batch_size: int = 8):
        self.model, self.tokenizer, self.device, self.batch_size = model.eval(), tokenizer, device, batch_size
        self.max_length = max_length or model.config.max_seq_len

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx = [self.tokenizer.eod_id] + self.tokenizer.encode(context)
            cont = self.tokenizer.encode(continuation)
            ids = (ctx + cont)[-(self.max_length + 1):]
            inputs = torch.tensor([ids[:-1]], device=self.device)
            logits = self.model(inputs)[0, -len(cont):].double()
            target = torch.tensor(cont, device=self.device)
            logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum().item()
            out.append((logp, bool((logits.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        docs = [Document(self.tokenizer.encode(req.args[0])) for req in requests]
        per_doc = score_documents(self.model, docs, seq_len=self.max_length, eod_id=self.tokenizer.eod_id,
                                  batch_size=self.batch_size, device=self.device)
        return [-per_doc[i] for i in range(len(docs))]

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, ``batch_size`` requests of one ``max_gen_toks`` at a time through the batched
        decoder; each stops at EOD, at one of its ``until`` strings (cut from the text) or after its
        ``max_gen_toks``. A context keeps its last ``max_length - max_gen_toks`` tokens (lm_eval's rule;
        ``loglikelihood`` keeps ``max_length``), so that context and continuation fit the positions the model has."""
        # a model's vocabulary may be padded past its tokenizer's: those ids have no text (a tokenizer without
        # vocab_size, as the tests' stand-ins, names every id of the model)
        vocab_size = getattr(self.tokenizer, "vocab_size", None)
        prompts, untils, limits = [], [], []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            limits.append(int(kwargs.get("max_gen_toks", 256)))
            prompt = [self.tokenizer.eod_id] + self.tokenizer.encode(context)
            prompts.append(prompt[-max(1, self.max_length - limits[-1]):])
        # batched by max_gen_toks (as lm_eval groups requests by their generation arguments): every row of a batch
        # is fed until the batch ends, so a row's context fits its positions only beside rows of its own limit
        out = [""] * len(prompts)
        for limit in sorted(set(limits)):
            group = [i for i, n in enumerate(limits) if n == limit]
            for start in range(0, len(group), self.batch_size):
                rows = group[start:start + self.batch_size]

                def should_stop(row: int, tokens: list[int]) -> bool:
                    text = self.tokenizer.decode(tokens)
                    return any(stop in text for stop in untils[rows[row]])

                tokens = generate(self.model, [prompts[i] for i in rows], limit, eos_ids=(self.tokenizer.eod_id,),
                                  should_stop=should_stop, vocab_size=vocab_size)
                for i, toks in zip(rows, tokens):
                    if toks and toks[-1] == self.tokenizer.eod_id:
                        toks = toks[:-1]
                    text = self.tokenizer.decode(toks)
                    for stop in untils[i]:
                        text = text.split(stop)[0]
                    out[i] = text
        return out


def make_lm_eval_model(checkpoint: str, tokenizer_path: str, **kwargs):
    """An ``lm_eval.api.model.LM`` for a checkpoint or export. Needs ``pip install lm_eval``."""
    try:
        from lm_eval.api.model import LM  # optional: the harness is only needed here
    except ImportError as e:
        raise ImportError("the lm_eval adapter needs lm-evaluation-harness: pip install lm_eval") from e

    device = kwargs.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint, device)

    class ReBasedLM(LMEvalMethods, LM):
        def __init__(self):
            LM.__init__(self)
            LMEvalMethods.__init__(self, model, Tokenizer(tokenizer_path), device=device, **kwargs)

    return ReBasedLM()
