"""The graphed training forward+backward (``GraphedStudent``): same outputs and gradients as eager.

On CPU only the plumbing is checked (the token-state round trip, eager fallback); the replay itself is
compared with the eager step on a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from mambatrim.engine.cuda_graph import GraphedStudent, _state_from_tree, _state_meta, _state_tree
from mambatrim.engine.losses import StudentForward
from mambatrim.models.vim import VisionMamba
from mambatrim.reduce import TokenState, rmeeto


def tiny_vim() -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=4, num_classes=5,
                       drop_path_rate=0.0)


def test_state_round_trip_keeps_tensors_and_drops_the_rest() -> None:
    state = TokenState(hidden=torch.randn(2, 5, 4), residual=None, positions=torch.arange(5).repeat(2, 1),
                       protected=torch.tensor([[0], [0]]), mask=torch.ones(2, 5), grid=(2, 2),
                       protected_layout="first", extras={"gates": [torch.ones(2), torch.zeros(2)], "note": "text"})
    back = _state_from_tree(_state_tree(state), _state_meta(state))
    assert back.residual is None and back.sizes is None
    assert torch.equal(back.protected, state.protected) and back.protected_layout == "first" and back.grid == (2, 2)
    assert torch.equal(back.hidden, state.hidden) and torch.equal(back.mask, state.mask)
    assert [torch.equal(a, b) for a, b in zip(back.extras["gates"], state.extras["gates"])] == [True, True]
    assert "note" not in back.extras


def test_cpu_inputs_run_eagerly() -> None:
    model = tiny_vim().train()
    graphed = GraphedStudent(StudentForward(model), model)
    x = torch.randn(2, 3, 32, 32)
    logits, state = graphed(x)
    ref_logits, _ = StudentForward(model)(x)
    assert torch.equal(logits, ref_logits) and graphed._graphed is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", [None, "rmeeto"])
def test_replayed_step_matches_eager_step(method: str | None) -> None:
    eager_model = tiny_vim().cuda().train()
    if method == "rmeeto":
        rmeeto.apply(eager_model, r=2, layers=[1, 2])
    graph_model = copy.deepcopy(eager_model)
    graphed = GraphedStudent(StudentForward(graph_model), graph_model, torch.bfloat16)
    eager = StudentForward(eager_model)
    for step in range(3):  # capture, then replays with new inputs
        x = torch.randn(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        outs = []
        for fwd, model in ((eager, eager_model), (graphed, graph_model)):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, state = fwd(x)
                loss = logits.float().logsumexp(-1).mean() + state.hidden.float().pow(2).mean()
            loss.backward()
            outs.append((logits.float().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
        assert graphed.failed is None and graphed._graphed is not None
        (l_e, g_e), (l_g, g_g) = outs
        torch.testing.assert_close(l_g, l_e, rtol=2e-2, atol=2e-2)
        assert g_e.keys() == g_g.keys()
        for name in g_e:
            err = (g_g[name] - g_e[name]).norm() / g_e[name].norm().clamp_min(1e-12)
            assert err < 2e-2, (step, name, float(err))
    # a different batch size falls back to the eager path
    logits, _ = graphed(torch.randn(2, 3, 32, 32, device="cuda"))
    assert logits.shape == (2, 5)
