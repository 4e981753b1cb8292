import pytest
import torch
from torch import nn

from entityseg.models.attention_layers import multihead_attention
from entityseg.models.heads import attention_mask


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_equals_nn_multihead_attention(masked):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    query, key = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    value = torch.randn(2, 11, 32)
    blocked = None
    if masked:  # the decoder's masks: some rows fully blocked are opened by the rule
        logits = torch.randn(2, 7, 11)
        logits[0, 3] = -5.0  # an empty mask: attends everywhere
        blocked = attention_mask(logits)
        assert blocked.shape == (2, 7, 11) and blocked.any()
        assert not blocked[0, 3].any()
    per_head = None if blocked is None else blocked.repeat_interleave(4, dim=0)  # [B*heads, ..]
    expected = attn(query, key, value, attn_mask=per_head)[0]
    torch.testing.assert_close(
        multihead_attention(attn, query, key, value, blocked), expected, rtol=1e-5, atol=1e-6
    )
