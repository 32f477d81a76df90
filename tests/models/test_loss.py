"""The chunked LM-head cross-entropy (pretrain/models/loss.py) equals F.cross_entropy on the full logits: the loss
and the gradients wrt the hidden states and the weight, in float64 (to ~1e-12), with ignored labels, token counts
that are not a multiple of the chunk, mean and sum, tied and untied embeddings in the model; under bf16 autocast
to bf16 accuracy; and no tensor of more than one chunk's logits is ever created."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.models.loss import chunked_cross_entropy
from pretrain.models.model import LMHead
from test_model import make_model, small_config

N, D, V = 37, 16, 53


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6, 20, 36]] = -100  # first, last and a run of ignored tokens
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, scale=0.37):
    """The loss and its gradients; the backward starts from a grad_output other than 1 (as the trainer's 1/accum)."""
    loss = fn(hidden, weight, labels)
    grad_hidden, grad_weight = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss, grad_hidden, grad_weight


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 4096])  # 37 % 8 = 5: a short last chunk
def test_matches_cross_entropy_float64(reduction, chunk):
    hidden, weight, labels = problem()
    ref = loss_and_grads(lambda h, w, y: F.cross_entropy(h @ w.T, y, reduction=reduction), hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens=chunk, reduction=reduction),
                         hidden, weight, labels)
    assert abs(got[0].item() - ref[0].item()) <= 1e-12 * abs(ref[0].item())
    assert rel(got[1], ref[1]) <= 1e-12 and rel(got[2], ref[2]) <= 1e-12
    assert got[1][[0, 5, 6, 20, 36]].abs().max() == 0, "ignored tokens get no gradient"


def test_ignore_index_batch_shape_and_no_grad():
    """A [B, T] batch with another ignore_index; under no_grad only the loss is computed."""
    hidden, weight, labels = problem()
    hidden3, labels2 = hidden[:36].reshape(4, 9, D), labels[:36].where(labels[:36] >= 0, 7).reshape(4, 9)
    ref = F.cross_entropy((hidden3 @ weight.T).flatten(0, 1), labels2.flatten(), ignore_index=7)
    got = chunked_cross_entropy(hidden3, weight, labels2, ignore_index=7, chunk_tokens=5)
    assert abs(got.item() - ref.item()) <= 1e-12 * ref.item()
    with torch.no_grad():
        assert chunked_cross_entropy(hidden3, weight, labels2, ignore_index=7, chunk_tokens=5).item() == got.item()
    all_ignored = torch.full((N,), -100)
    assert F.cross_entropy(hidden @ weight.T, all_ignored).isnan()  # the reference's convention, kept
    assert chunked_cross_entropy(hidden, weight, all_ignored).isnan()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_model_loss_matches_full_logits(tie, reduction):
    """Through CausalLM.forward(labels=...): every parameter gradient, the tied embedding/LM-head weight included
    (it sums the embedding's and the head's gradients), equals that of F.cross_entropy on the full logits."""
    model = make_model(small_config(["short_conv", "rebased"], tie_embeddings=tie))
    ids = torch.randint(0, 97, (2, 19))
    labels = torch.randint(0, 97, (2, 19))
    labels[0, :4] = -100

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        (0.25 * loss).backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = run(lambda: F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction=reduction))
    got_loss, got = run(lambda: model(ids, labels=labels, reduction=reduction, loss_chunk_tokens=7))
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert abs(got_loss - ref_loss) <= 1e-12 * ref_loss
    assert ref.keys() == got.keys()
    bad = {n: rel(got[n], ref[n]) for n in ref if rel(got[n], ref[n]) > 1e-10}
    assert not bad, bad
    if reduction == "mean":
        assert model.loss(ids, labels, loss_chunk_tokens=7).item() == got_loss


@pytest.mark.parametrize("dtypes", ["fp32_weight", "bf16_weight"])
def test_bf16(dtypes):
    """fp32 master weight under bf16 autocast (single/DDP), or bf16 hidden and weight without autocast (FSDP2's
    bf16 parameters, DeepSpeed bf16): the loss of the same bf16 logits as F.cross_entropy's (to fp32 rounding; fp32
    logits would be 3e-5 away), gradients in the inputs' dtypes, about as close to the float64 truth as
    F.cross_entropy's (~5e-3, bf16)."""
    hidden64, weight64, labels = problem()
    truth = loss_and_grads(lambda h, w, y: F.cross_entropy(h @ w.T, y), hidden64, weight64, labels)
    dtype = torch.float32 if dtypes == "fp32_weight" else torch.bfloat16
    hidden = hidden64.detach().to(dtype).requires_grad_()
    weight = weight64.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
        got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens=8), hidden, weight, labels)
        plain = loss_and_grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), hidden, weight, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert rel(got[0], plain[0]) <= 1e-6
    for g, p, t in zip(got, plain, truth):
        assert rel(g.double(), t) <= max(2 * rel(p.double(), t), 1e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk,largest", [(20, 20 * V), (0, N * V)])  # 20 · V > the [V, D] weight
def test_never_more_than_one_chunk_of_logits(chunk, largest):
    """Forward and backward through the model's head create no tensor larger than one chunk's logits (the full
    logits path, chunk 0, does: the measurement sees them)."""
    hidden, _, labels = problem(dtype=torch.float32)
    head = LMHead(D, V, bias=False)
    with LargestTensor() as seen:
        head(hidden, labels, chunk_tokens=chunk).backward()
    assert seen.largest == largest
    assert hidden.grad is not None and head.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton loss kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_chunk_on_cuda(dtype):
    """The CUDA path (the Triton loss-and-gradient kernel per chunk) against float64 F.cross_entropy on the same
    rounded inputs."""
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 300, 64, 1000
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) / d ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    ours = [x.cuda().requires_grad_() for x in (hidden, weight)]
    loss = chunked_cross_entropy(ours[0], ours[1], labels.cuda(), chunk_tokens=128)
    grads = torch.autograd.grad(loss, ours)
    ref = [x.double().requires_grad_() for x in (hidden, weight)]
    loss_ref = F.cross_entropy(ref[0] @ ref[1].T, labels)
    grads_ref = torch.autograd.grad(loss_ref, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    for a, r in zip(grads, grads_ref):
        assert a.dtype == dtype
        assert ((a.double().cpu() - r).norm() / r.norm()).item() <= tol


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_dot_tf32x3_routes_the_three_matmuls(monkeypatch, reduction):
    """fp32_dot="tf32x3": the head's three matmuls go through kernels.matmul_tf32x3 (here its Triton GEMM: IEEE fp32
    under the interpreter, 3xTF32 on CUDA) and the loss and gradients keep fp32 accuracy; other values are refused."""
    pytest.importorskip("triton")
    import kernels

    monkeypatch.setenv("REBASED_KERNEL_BACKEND", "triton")
    calls = []
    real = kernels.matmul_tf32x3
    monkeypatch.setattr(kernels, "matmul_tf32x3", lambda a, b: calls.append(a.shape) or real(a, b))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels run interpreted only without CUDA
    hidden, weight, labels = problem()
    ref = loss_and_grads(lambda h, w, y: F.cross_entropy(h @ w.T, y, reduction=reduction), hidden, weight, labels)
    h32, w32 = (x.detach().float().to(dev).requires_grad_() for x in (hidden, weight))
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens=16, reduction=reduction,
                                                               fp32_dot="tf32x3"), h32, w32, labels.to(dev))
    assert len(calls) == 3 * 3, "logits, hidden gradient and weight gradient of each of the 3 chunks"
    assert abs(got[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    assert rel(got[1].double().cpu(), ref[1]) <= 1e-5 and rel(got[2].double().cpu(), ref[2]) <= 1e-5
    calls.clear()
    chunked_cross_entropy(*(x.to(dev) for x in (hidden, weight, labels)), fp32_dot="tf32x3")  # float64: plain
    assert not calls
    with pytest.raises(ValueError, match="fp32_dot"):
        chunked_cross_entropy(h32, w32, labels.to(dev), fp32_dot="tf32")
