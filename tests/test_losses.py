"""Loss functions against PyTorch's reference implementations."""

import pytest
import torch
import torch.nn.functional as F

from nanomind.train.losses import linear_cross_entropy


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_linear_cross_entropy_matches_reference(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (50,))
    labels[[3, 17, 18]] = -100  # ignored rows: no loss, no gradient
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    (ref * 3.0).backward()  # an upstream scale must reach both gradients
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    (got * 3.0).backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(hidden.grad, ref_grads[0])
    torch.testing.assert_close(weight.grad, ref_grads[1])
    assert hidden.grad[[3, 17, 18]].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk=chunk), ref)


def test_tied_weight_gets_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 8).double()
    ids, labels = torch.randint(0, 20, (12,)), torch.randint(0, 20, (12,))
    F.cross_entropy(emb(ids) @ emb.weight.T, labels).backward()
    ref = emb.weight.grad.clone()
    emb.weight.grad = None
    linear_cross_entropy(emb(ids), emb.weight, labels, chunk=5).backward()
    torch.testing.assert_close(emb.weight.grad, ref)


def test_bad_labels_are_refused():
    with pytest.raises(AssertionError, match="-100"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, -3]))
