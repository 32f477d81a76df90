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
    token the model saw before each document in training (an empty context is EOD alone).

    A (context, continuation) pair is tokenized by lm_eval's convention: trailing whitespace of the context moves
    to the front of the continuation, the two are encoded as one text, and the continuation is what follows the
    context's own encoding. So the continuation's tokens are those of running text (no SentencePiece dummy prefix
    before it, no lone space token after the context). Where that encoding does not start with the context's
    (a token spans the boundary, as in "the ca" + "t"), the continuation is encoded on its own.
    """

    def __init__(self, model, tokenizer, *, max_length: int | None = None, device="cpu", batch_size: int = 8):
        self.model, self.tokenizer, self.device, self.batch_size = model.eval(), tokenizer, device, batch_size
        self.max_length = max_length or model.config.max_seq_len

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        ctx = self.tokenizer.encode(stripped)
        whole = self.tokenizer.encode(stripped + continuation)
        # a token across the boundary ("the ca" + "t"): split there, the continuation would lose text (or all of
        # it, scoring 0 as if certain); encoded apart instead
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tokenizer.encode(continuation)
        return [self.tokenizer.eod_id] + ctx, cont

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Per request, the summed log-probability (float64) of the continuation's tokens after the context, and
        whether each of them is the model's argmax over the tokenizer's ids (what greedy decoding would pick).

        A continuation token sees at most ``max_length`` tokens: the context is cut on the left and the
        continuation kept whole; a continuation of more than ``max_length`` tokens is scored in windows of
        ``max_length`` targets from its end, each predicted from the ``max_length`` tokens before its last target.
        An empty continuation scores 0 and is greedy. Windows are batched by length; results are in request order.
        """
        vocab_size = getattr(self.tokenizer, "vocab_size", None)  # the model's ids past it are padding
        windows = []  # (request, inputs, targets): the targets are the inputs' last predictions
        for r, req in enumerate(requests):
            ctx, cont = self._encode_pair(req.args[0], req.args[1])
            stream = ctx + cont
            end = len(stream)
            while end > len(ctx):
                first = max(len(ctx), end - self.max_length)
                windows.append((r, stream[max(0, end - 1 - self.max_length):end - 1], stream[first:end]))
                end = first
        logp = [0.0] * len(requests)
        greedy = [True] * len(requests)
        order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1]))  # similar lengths: less padding
        for start in range(0, len(order), self.batch_size):
            batch = [windows[w] for w in order[start:start + self.batch_size]]
            ids = torch.zeros(len(batch), len(batch[0][1]), dtype=torch.long)
            for b, (_, inputs, _) in enumerate(batch):  # right padding: a causal model's real positions never see it
                ids[b, :len(inputs)] = torch.tensor(inputs)
            logits = self.model(ids.to(self.device))
            for b, (r, inputs, targets) in enumerate(batch):
                scored = logits[b, len(inputs) - len(targets):len(inputs)].double()
                target = torch.tensor(targets, device=scored.device)
                logp[r] += F.log_softmax(scored, dim=-1).gather(1, target[:, None]).sum().item()
                greedy[r] &= bool((scored[:, :vocab_size].argmax(-1) == target).all())
        return list(zip(logp, greedy))

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        """Per request, the summed log-probability of all the text's tokens, in non-overlapping windows of
        ``max_length`` targets: the first predicted from EOD on, each later one from the last token of the window
        before it (``pretrain.evaluation.scoring``'s default windows)."""
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
            # an empty string would end every row after one token (and str.split refuses it): not a stop string
            untils.append([s for s in ([until] if isinstance(until, str) else until) if s])
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
