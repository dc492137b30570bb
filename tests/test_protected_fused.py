"""Direction gates on the fused Triton Vim mixer for any number of protected tokens (P = 0, 1, 3): the gate
decisions equal a linear threshold on the explicit gate feature (the class token's in_proj row, the mean of the
protected rows, the mean of all rows), and the mixer's output equals the per-direction PyTorch path. P = 1 runs
the fused class-token gate kernel, other P the feature in PyTorch; both inside the fused mixer. Triton
interpreter on CPU, tiny shapes."""
from __future__ import annotations


import pytest
import torch

from triton_guard import DEVICE, triton  # noqa: E402,F401  (before the kernels are imported)

from mambatrim.contract import LinearDirectionGate, MixerContext  # noqa: E402
from mambatrim.models.mamba import BiMambaMixer  # noqa: E402
from mambatrim.ops import policy, triton_vim, use_backend  # noqa: E402



@pytest.mark.parametrize("protected", [[[], [], []], [[2], [0], [6]], [[0, 3, 5], [1, 2, 6], [4, 5, 6]]])
def test_fused_mixer_gate_reads_the_gate_feature(protected: list[list[int]], monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    mixer = BiMambaMixer(16).to(DEVICE).eval()
    hidden = torch.randn(3, 7, 16, device=DEVICE)
    index = torch.tensor(protected, dtype=torch.long, device=DEVICE).reshape(3, -1)
    with torch.no_grad():
        xz = mixer.in_proj(hidden).float()
        feature = xz.mean(1) if index.shape[1] == 0 else torch.stack([xz[b, index[b]].mean(0) for b in range(3)])
        weight = torch.randn(2, xz.shape[-1], device=DEVICE)
        # thresholds between the samples' scores: a mix of on and off decisions, none near 0
        scores = feature @ weight.t()
        bias = -scores.median(0).values + torch.tensor([1e-3, -1e-3], device=DEVICE)
    want_gate = (scores + bias > 0).float()
    calls: list[tuple] = []
    inner = triton_vim.bimamba_forward_triton

    def spy(*args, **kwargs):
        calls.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(triton_vim, "bimamba_forward_triton", spy)
    ctx = MixerContext(protected=index, direction_gate=LinearDirectionGate(weight, bias), skip_gated=True)
    with torch.no_grad(), policy.override(scan_fwd_block_d=16, conv_block_l=4, conv_block_e=16):
        with use_backend("triton"):
            got = mixer(hidden, ctx)
        fused_gate = mixer.last_stats["gate"]
        with use_backend("torch"):
            want = mixer(hidden, ctx)
    assert len(calls) == 1 and (calls[0][3] is not None) == (index.shape[1] == 1)  # the kernel only for P = 1
    assert torch.equal(fused_gate.cpu(), want_gate.cpu())
    assert 0 < want_gate.sum() < want_gate.numel()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
