"""RoPE: rotation by the global position (relative-position property, the complex-number form)."""
import torch

from lctrain.models.rope import apply_rope, rope_cos_sin
from lctrain.testing.compare import assert_close


def test_rope_rotates_by_global_position():
    d = 8
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([pq]), d, 10000.0, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([pk]), d, 10000.0, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    # The score depends on the positions only through their difference; position 0 is the identity.
    assert_close(score(7, 3), score(1004, 1000), "relative")
    cos, sin = rope_cos_sin(torch.tensor([0]), d, 10000.0, torch.float64)
    assert torch.equal(apply_rope(q, cos, sin), q)
    # First pair rotates by angle p (inv_freq = 1): complex multiplication by e^{ip}.
    cos, sin = rope_cos_sin(torch.tensor([5]), d, 10000.0, torch.float64)
    z = torch.complex(q[..., 0], q[..., d // 2]) * torch.exp(torch.tensor(5j, dtype=torch.complex128))
    out = apply_rope(q, cos, sin)
    assert_close(out[..., 0], z.real, "re")
    assert_close(out[..., d // 2], z.imag, "im")
