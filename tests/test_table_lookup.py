"""lookup_rows: the same rows as table[labels], and each row's gradient is the sum over its labels."""
import pytest
import torch

from mambatrim.ops import policy
from mambatrim.ops.table_lookup import lookup_rows


@pytest.mark.parametrize("setting", ["onehot", "index"])
def test_rows_and_gradient_match_a_per_label_sum(setting):
    torch.manual_seed(0)
    table = torch.randn(5, 16, requires_grad=True)
    labels = torch.randint(0, 5, (4, 3, 7))
    labels[0, 0, 0] = 4  # every row is picked at least once, and row 2 never: its gradient must stay zero
    labels[labels == 2] = 1
    weight = torch.randn(4, 3, 7, 16)
    with policy.override(table_lookup_grad=setting):
        out = lookup_rows(table, labels)
        (out * weight).sum().backward()
    assert torch.equal(out, table.detach()[labels])
    expected = torch.zeros(5, 16, dtype=torch.float64)
    for row, w in zip(labels.reshape(-1).tolist(), weight.reshape(-1, 16).double()):
        expected[row] += w
    assert expected[2].abs().max() == 0
    torch.testing.assert_close(table.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_plainmamba_gradients_do_not_depend_on_the_setting():
    """The model's direction terms go through lookup_rows: both backward settings give the same gradients."""
    from mambatrim.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("plainmamba_l1", depth=2, num_classes=3, img_size=(24, 20), patch_size=4,
                         drop_path_rate=0.0)
    images = torch.randn(2, 3, 24, 20)
    grads = {}
    for setting in ("onehot", "index"):
        model.zero_grad(set_to_none=True)
        with policy.override(table_lookup_grad=setting):
            model(images).square().sum().backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("direction_Bs" in n for n in grads["onehot"])
    for name, grad in grads["index"].items():
        torch.testing.assert_close(grads["onehot"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert grads["onehot"]["backbone.layers.1.mamba.direction_Bs"].abs().sum() > 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        lookup_rows(torch.zeros(5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        lookup_rows(torch.zeros(5, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="table_lookup_grad"):
        with policy.override(table_lookup_grad="sorted"):
            pass
